"""A seeded PHI-trap corpus: CT and Enhanced CT objects with PHI planted wherever it hides.

Separate from `phi_corpus` (the simple generator). Every planted value is distinct, at least 8
characters long and recorded in `PhiTrap.planted`, so a test can search for each one in every
byte the archive wrote or answered. The traps: person names at depths 0 to 3, other patient
IDs, request attributes, institution and device identity, free-text descriptions and comments,
private tags of several vendors (with a private sequence holding a person name), overlays and
curves, the file meta's source AE title, multi-valued UIDs, UIDs the PS3.15 table does not list,
and date-times inside functional groups. What is not a searchable value (ages over 89, the time
zone offset) is planted too and checked by the tests from the retrieved objects.

Every object gets an InstanceNumber unique in the corpus, so a test can pair each retrieved
object with its original.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

_ROOT = "1.2.826.0.1.3680043.10.1234.77."
_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"
SIZE = 16  # rows and columns
TIMEZONE_OFFSET = "+0100"


@dataclass
class TrapPatient:
    patient_id: str
    name: str
    birth_date: str
    age: str  # over 89 years: must come back as 090Y


@dataclass
class TrapStudy:
    patient: TrapPatient
    date: dt.date
    study_uid: str
    accession: str
    study_id: str
    frame_uid: str


@dataclass
class PhiTrap:
    """Makes patients, studies and objects; `planted` holds every planted value."""

    seed: int
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    planted: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._instances = 0

    # --- planted values ------------------------------------------------------------------

    def plant(self, value: str) -> str:
        assert len(value) >= 8 and value not in self.planted, value
        self.planted.add(value)
        return value

    def _letters(self, prefix: str) -> str:
        return prefix + "".join(self.rng.choice(_LETTERS) for _ in range(8))

    def token(self, prefix: str) -> str:
        """A planted text value; prefixes of at most 8 characters keep it within SH."""
        return self.plant(self._letters(prefix))

    def name(self, prefix: str) -> str:
        """A planted person name; each of its two components is searchable on its own."""
        return self.plant(f"{self._letters(prefix + 'F')}^{self._letters(prefix + 'G')}")

    def uid(self) -> str:
        return self.plant(generate_uid(prefix=_ROOT, entropy_srcs=[str(self.rng.random())]))

    def date_time(self, day: dt.date) -> str:
        """A planted DT on `day`: the whole value is unique (microseconds), the time is not."""
        moment = dt.datetime.combine(day, dt.time(self.rng.randint(7, 18), self.rng.randint(0, 59),
                                                  self.rng.randint(0, 59),
                                                  self.rng.randint(0, 999999)))
        return self.plant(moment.strftime("%Y%m%d%H%M%S.%f"))

    # --- patients and studies ------------------------------------------------------------

    def patient(self, age: str = "097Y") -> TrapPatient:
        born = dt.date(1920 + self.rng.randint(0, 9), self.rng.randint(1, 12),
                       self.rng.randint(1, 28))
        return TrapPatient(self.token("PID"), self.name("PAT"),
                           self.plant(born.strftime("%Y%m%d")), age)

    def study(self, patient: TrapPatient, date: dt.date) -> TrapStudy:
        return TrapStudy(patient, date, self.uid(), self.token("ACCN"), self.token("STUDYID"),
                         self.uid())

    # --- objects -------------------------------------------------------------------------

    def ct_series(self, study: TrapStudy, slices: int = 3) -> list[Path]:
        series_uid = self.uid()
        files = []
        for position in range(slices):
            ds = self._base(study, CTImageStorage, series_uid)
            ds.ImagePositionPatient = [0.0, 0.0, float(position)]
            ds.AcquisitionDateTime = self.date_time(study.date)
            self._pixels(ds, frames=1)
            files.append(self._write(ds))
        return files

    def enhanced_ct(self, study: TrapStudy, frames: int = 2) -> Path:
        """One Enhanced CT object; planted date-times inside its functional groups."""
        ds = self._base(study, EnhancedCTImageStorage, self.uid())
        ds.AcquisitionDateTime = self.date_time(study.date)
        shared = Dataset()
        measures = Dataset()
        measures.PixelSpacing = [0.5, 0.5]
        measures.SliceThickness = 1.0
        shared.PixelMeasuresSequence = [measures]
        event = Dataset()
        event.IrradiationEventUID = self.uid()
        shared.IrradiationEventIdentificationSequence = [event]
        shared.FrameContentSequence = [self._frame_content(study, 0)]
        ds.SharedFunctionalGroupsSequence = [shared]
        per_frame = []
        for number in range(1, frames + 1):
            item = Dataset()
            item.FrameContentSequence = [self._frame_content(study, number)]
            plane = Dataset()
            plane.ImagePositionPatient = [0.0, 0.0, float(number)]
            item.PlanePositionSequence = [plane]
            per_frame.append(item)
        ds.PerFrameFunctionalGroupsSequence = per_frame
        self._pixels(ds, frames=frames)
        return self._write(ds)

    def _frame_content(self, study: TrapStudy, number: int) -> Dataset:
        content = Dataset()
        content.FrameAcquisitionNumber = number
        content.FrameAcquisitionDateTime = self.date_time(study.date)
        content.FrameReferenceDateTime = self.date_time(study.date)
        content.FrameComments = self.token("FRAMECMT")
        return content

    def _base(self, study: TrapStudy, sop_class: str, series_uid: str) -> Dataset:
        patient = study.patient
        self._instances += 1
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = self.uid()
        ds.StudyInstanceUID = study.study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = study.frame_uid
        ds.Modality = "CT"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = study.date.strftime("%Y%m%d")
        ds.StudyTime = ds.ContentTime = "101500"
        ds.TimezoneOffsetFromUTC = TIMEZONE_OFFSET
        ds.AccessionNumber = study.accession
        ds.StudyID = study.study_id
        ds.PatientName = patient.name
        ds.PatientID = patient.patient_id
        ds.PatientBirthDate = patient.birth_date
        ds.PatientAge = patient.age
        ds.PatientSex = "F"
        ds.Manufacturer = "ACME MEDICAL"
        ds.SeriesNumber = 1
        ds.InstanceNumber = self._instances
        self._names(ds)
        self._patient_text(ds)
        self._institution_and_device(ds)
        self._descriptions(ds)
        self._requests(ds)
        self._uids(ds)
        self._private(ds)
        self._graphics(ds)
        return ds

    def _names(self, ds: Dataset) -> None:
        """Person names at depth 0, then one more at each depth of a three-deep chain."""
        ds.ReferringPhysicianName = self.name("REF")
        ds.PerformingPhysicianName = self.name("PERF")
        ds.OperatorsName = [self.name("OPA"), self.name("OPB")]
        ds.PhysiciansOfRecord = self.name("REC")
        ds.NameOfPhysiciansReadingStudy = self.name("READ")
        observer = Dataset()
        observer.VerifyingObserverName = self.name("VOBS")
        observer.VerificationDateTime = self.date_time(dt.date(2021, 1, 5))
        ds.VerifyingObserverSequence = [observer]
        depth1, depth2, depth3 = Dataset(), Dataset(), Dataset()
        depth1.SeriesInstanceUID = self.uid()
        depth1.SecondaryReviewerName = self.name("DEPONE")
        depth2.PersonName = self.name("DEPTWO")
        depth2.ReferencedSOPClassUID = CTImageStorage
        depth2.ReferencedSOPInstanceUID = self.uid()
        depth3.SecondaryReviewerName = self.name("DEPTHR")
        depth3.PerformingPhysicianName = self.name("DEPTHP")
        depth3.ReferencedSOPClassUID = CTImageStorage
        depth3.ReferencedSOPInstanceUID = self.uid()
        depth2.ReferencedSOPSequence = [depth3]
        depth1.ReferencedInstanceSequence = [depth2]
        ds.ReferencedSeriesSequence = [depth1]

    def _patient_text(self, ds: Dataset) -> None:
        ds.OtherPatientNames = self.name("OTHN")
        ds.PatientMotherBirthName = self.name("MOTH")
        ds.PatientAddress = self.token("PATADDR")
        ds.AdditionalPatientHistory = self.token("HISTORY")
        ds.PatientComments = self.token("PATCMT")
        other = Dataset()
        other.PatientID = self.token("OTHERID")
        other.IssuerOfPatientID = self.token("ISSUER")
        other.TypeOfPatientID = "TEXT"
        ds.OtherPatientIDsSequence = [other]
        facility = Dataset()
        facility.LocalNamespaceEntityID = self.token("FACILITY")
        qualifiers = Dataset()
        qualifiers.UniversalEntityID = self.token("ENTITYID")
        qualifiers.UniversalEntityIDType = "ISO"
        qualifiers.AssigningFacilitySequence = [facility]
        qualifiers.AssigningAgencyOrDepartmentCodeSequence = [self.code("DEPTCODE")]
        qualifiers.AssigningJurisdictionCodeSequence = [self.code("JURISDIC")]
        ds.IssuerOfPatientIDQualifiersSequence = [qualifiers]

    def code(self, prefix: str) -> Dataset:
        """A local code whose value and meaning name something (a department, a place)."""
        item = Dataset()
        item.CodeValue = self.token(prefix)
        item.CodingSchemeDesignator = "99LOCAL"
        item.CodeMeaning = self.token(prefix + "MEANING")
        return item

    def _institution_and_device(self, ds: Dataset) -> None:
        ds.InstitutionName = self.token("INSTNAME")
        ds.InstitutionAddress = self.token("INSTADDR")
        ds.InstitutionalDepartmentName = self.token("DEPTNAME")
        ds.StationName = self.token("STATION")
        ds.DeviceSerialNumber = self.token("SERIALNO")

    def _descriptions(self, ds: Dataset) -> None:
        ds.StudyDescription = self.token("STUDYDSC")
        ds.SeriesDescription = self.token("SERIEDSC")
        ds.ImageComments = self.token("IMAGECMT")
        ds.ProtocolName = self.token("PROTOCOL")
        ds.AcquisitionComments = self.token("ACQCMT")
        ds.DerivationDescription = self.token("DERIVED")
        ds.PerformedProcedureStepDescription = self.token("PPSDESC")
        ds.PerformedProcedureStepID = self.token("PPSID")

    def _requests(self, ds: Dataset) -> None:
        request = Dataset()
        request.RequestedProcedureDescription = self.token("REQDESC")
        request.ScheduledProcedureStepDescription = self.token("SPSDESC")
        request.RequestedProcedureID = self.token("REQPID")
        request.ScheduledProcedureStepID = self.token("SPSID")
        request.ReasonForTheRequestedProcedure = self.token("REASON")
        ds.RequestAttributesSequence = [request]

    def _uids(self, ds: Dataset) -> None:
        """A multi-valued UID (VM 1-n) and UIDs PS3.15 Table E.1-1 does not list."""
        ds.IrradiationEventUID = [self.uid(), self.uid()]
        ds.CreatorVersionUID = self.uid()
        ds.VolumeFrameOfReferenceUID = self.uid()
        ds.TableFrameOfReferenceUID = self.uid()
        ds.SOPInstanceUIDOfConcatenationSource = self.uid()
        ds.MultiFrameSourceSOPInstanceUID = self.uid()
        region = Dataset()  # a standard code, extended by an organization with a UID of its own
        region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = (
            "51185008", "SCT", "Chest")
        region.ContextIdentifier = "4031"
        region.ContextGroupExtensionFlag = "Y"
        region.ContextGroupLocalVersion = self.date_time(dt.date(2020, 11, 2))
        region.ContextGroupExtensionCreatorUID = self.uid()
        ds.AnatomicRegionSequence = [region]

    def _private(self, ds: Dataset) -> None:
        """GE (0009, 0019, 0043), Siemens (0029, CSA header) and Philips (2001, 2005) blocks."""
        ds.private_block(0x0009, "GEMS_IDEN_01", create=True).add_new(
            0x02, "SH", self.token("GESUITE"))
        acquisition = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
        acquisition.add_new(0x9E, "LO", self.token("GEPULSE"))
        item = Dataset()
        item.PatientName = self.name("PRIVSQ")
        item.private_block(0x0019, "GEMS_ACQU_01", create=True).add_new(
            0x10, "LO", self.token("GEINNER"))
        acquisition.add_new(0x50, "SQ", Sequence([item]))
        ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(
            0x29, "LO", self.token("GEPARAM"))
        csa = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
        csa.add_new(0x08, "CS", "IMAGE NUM 4")
        csa.add_new(0x10, "OB", self._padded(b"SV10\x04\x03\x02\x01", self.token("CSAIMAGE")))
        csa.add_new(0x20, "OB", self._padded(b"SV10\x04\x03\x02\x01", self.token("CSASERIE")))
        ds.private_block(0x2001, "Philips Imaging DD 001", create=True).add_new(
            0x08, "LO", self.token("PHILIMG"))
        ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True).add_new(
            0x0D, "LO", self.token("PHILMR"))

    @staticmethod
    def _padded(head: bytes, text: str, length: int = 64) -> bytes:
        return (head + text.encode("ascii")).ljust(length, b"\x00")

    def _graphics(self, ds: Dataset) -> None:
        """An overlay (group 6000) and a curve (group 5000), each with planted text and data."""
        ds.add_new(0x60000010, "US", SIZE)
        ds.add_new(0x60000011, "US", SIZE)
        ds.add_new(0x60000022, "LO", self.token("OVLDESC"))
        ds.add_new(0x60000040, "CS", "G")
        ds.add_new(0x60000050, "SS", [1, 1])
        ds.add_new(0x60000100, "US", 1)
        ds.add_new(0x60000102, "US", 0)
        ds.add_new(0x60003000, "OW", self._padded(b"", self.token("OVLDATA"), SIZE * SIZE // 8))
        ds.add_new(0x60004000, "LT", self.token("OVLCMT"))
        ds.add_new(0x50000005, "US", 1)
        ds.add_new(0x50000010, "US", 8)
        ds.add_new(0x50000020, "CS", "TAC")
        ds.add_new(0x50000022, "LO", self.token("CURVDESC"))
        ds.add_new(0x50000103, "US", 0)
        ds.add_new(0x50003000, "OB", self._padded(b"", self.token("CURVDATA"), 32))

    def _pixels(self, ds: Dataset, frames: int) -> None:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = SIZE
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PixelData = self.rng.randbytes(SIZE * SIZE * 2 * frames)

    def _write(self, ds: Dataset) -> Path:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.SourceApplicationEntityTitle = self.token("SRCAE")
        ds.file_meta = meta
        ds.preamble = self.token("PREAMBLE").encode("ascii").ljust(128, b"\x00")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"trap{len(self.files):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        self.files.append(path)
        return path
