"""A seeded generator of small CT objects with planted PHI, for end-to-end leak tests.

Every planted value is distinct, at least 8 characters, and recorded, so a test can search
for each one in every byte the archive wrote or answered.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

_ROOT = "1.2.826.0.1.3680043.10.1234."


@dataclass
class PlantedPatient:
    patient_id: str
    name: str
    birth_date: str
    issuer: str = ""  # IssuerOfPatientID, "" for none


@dataclass
class Corpus:
    files: list[Path] = field(default_factory=list)
    planted: set[str] = field(default_factory=set)

    def plant(self, value: str) -> str:
        self.planted.add(value)
        return value


class PhiCorpus:
    """Makes patients, studies and slices; `corpus.planted` holds every planted value."""

    def __init__(self, seed: int, out_dir: Path) -> None:
        self.rng = random.Random(seed)
        self.out_dir = out_dir
        self.corpus = Corpus()

    def _token(self, prefix: str) -> str:
        return prefix + "".join(self.rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(8))

    def _uid(self) -> str:
        return self.corpus.plant(generate_uid(prefix=_ROOT, entropy_srcs=[str(self.rng.random())]))

    def patient(self, patient_id: str | None = None, issuer: str | bool = "") -> PlantedPatient:
        """A patient; `issuer` its IssuerOfPatientID (True: a planted random one)."""
        plant = self.corpus.plant
        if issuer:
            issuer = plant(self._token("ISSUER") if issuer is True else issuer)
        return PlantedPatient(
            patient_id=plant(patient_id or self._token("PID")),
            name=plant(f"{self._token('FAM')}^{self._token('GIV')}"),
            birth_date=plant(dt.date(1930 + self.rng.randint(0, 30), self.rng.randint(1, 9),
                                     self.rng.randint(10, 19)).strftime("%Y%m%d")),
            issuer=issuer or "",
        )

    def study(
        self, patient: PlantedPatient, study_date: dt.date, slices: int = 3,
        study_uid: str | None = None, modality: str = "CT", size: int = 16,
    ) -> list[Path]:
        """One study of one series of `size` x `size` images; returns the written files."""
        plant = self.corpus.plant
        study_uid = study_uid or self._uid()
        series_uid = self._uid()
        frame_uid = self._uid()
        accession = plant(self._token("ACC"))
        shared = {
            "referring": plant(f"{self._token('REF')}^{self._token('DOC')}"),
            "operator": plant(f"{self._token('OPR')}^{self._token('TOR')}"),
            "institution": plant(self._token("INSTITUTE")),
            "address": plant(self._token("STREET")),
            "station": plant(self._token("STN")),
            "description": plant(self._token("DESCR")),
            "comment": plant(self._token("COMMENT")),
            "private": plant(self._token("PRIVATE")),
            "nested_name": plant(f"{self._token('NEST')}^{self._token('ED')}"),
            "other_id": plant(self._token("OTHERID")),
            "requested": plant(self._token("REQPROC")),
            "serial": plant(self._token("SERIAL")),
            "source_ae": plant(self._token("SRC")[:16]),
        }
        files = []
        for number in range(1, slices + 1):
            ds = Dataset()
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = self._uid()
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.FrameOfReferenceUID = frame_uid
            ds.Modality = modality
            ds.StudyDate = study_date.strftime("%Y%m%d")
            ds.SeriesDate = study_date.strftime("%Y%m%d")
            ds.AcquisitionDateTime = study_date.strftime("%Y%m%d") + "101530.000000"
            ds.StudyTime = "101500"
            ds.AccessionNumber = accession
            ds.StudyID = plant(self._token("SID")[:16])
            ds.PatientName = patient.name
            ds.PatientID = patient.patient_id
            if patient.issuer:
                ds.IssuerOfPatientID = patient.issuer
            ds.PatientBirthDate = patient.birth_date
            ds.PatientSex = "F"
            ds.PatientAge = "095Y"
            ds.ReferringPhysicianName = shared["referring"]
            ds.OperatorsName = shared["operator"]
            ds.InstitutionName = shared["institution"]
            ds.InstitutionAddress = shared["address"]
            ds.StationName = shared["station"]
            ds.StudyDescription = shared["description"]
            ds.ImageComments = shared["comment"]
            ds.DeviceSerialNumber = shared["serial"]
            ds.Manufacturer = "ACME MEDICAL"
            other = Dataset()
            other.PatientID = shared["other_id"]
            ds.OtherPatientIDsSequence = Sequence([other])
            request = Dataset()
            request.RequestedProcedureDescription = shared["requested"]
            inner = Dataset()
            inner.PersonName = shared["nested_name"]
            request.ContentSequence = Sequence([inner])
            ds.RequestAttributesSequence = Sequence([request])
            block = ds.private_block(0x0011, "PHI VENDOR", create=True)
            block.add_new(0x01, "LO", shared["private"])
            ds.SeriesNumber = 1
            ds.InstanceNumber = number
            ds.ImagePositionPatient = [0, 0, float(number)]
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = ds.Columns = size
            ds.BitsAllocated = ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 0
            ds.RescaleIntercept = -1024
            ds.RescaleSlope = 1
            ds.PixelData = bytes(self.rng.getrandbits(8) for _ in range(size * size * 2))
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.SourceApplicationEntityTitle = shared["source_ae"]
            ds.file_meta = meta
            path = self.out_dir / f"{len(self.corpus.files) + len(files):05d}.dcm"
            self.out_dir.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        self.corpus.files.extend(files)
        return files
