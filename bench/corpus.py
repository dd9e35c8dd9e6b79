"""Seeded synthetic corpus for the benchmarks: CT series and chest radiographs with realistic
headers (and identifying values, so de-identification does its full work).

    python bench/corpus.py --out /var/tmp/ricord-bench/corpus [--seed 1234]

Sets (each in its own folder with a manifest.json):

    big    2 patients x 1 study x 1 series x 200 CT slices 512x512 int16    400 files, ~211 MB
    small  10 patients x 1 study x 1 series x 50 CT slices 64x64             500 files, ~11 KB each
    qido   50 patients x 2 studies x 2 series x 25 CT slices 64x64         5,000 files, 100 studies
    cr     4 chest radiographs 2000x2500 uint16, 12 bits (2 CR + 2 DX)       ~10 MB each

Same seed, same files (byte for byte): UIDs derive from the seed and the set's name, so the
sets never collide and can be loaded into one archive together. Patient names are unique, and
in the qido set ten patients share each family name (so `FAMILY^*` matches ten patients). A
folder that already holds a corpus of the same version and seed is reused, not rewritten.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

VERSION = 2
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"
UID_ROOT = "1.2.826.0.1.3680043.10.1235."
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.1235.1"


@dataclass(frozen=True)
class Shape:
    code: int                  # keeps patient IDs and accession numbers of the sets disjoint
    patients: int
    studies: int = 1
    series: int = 1
    slices: int = 0
    size: int = 512
    radiographs: int = 0
    families: tuple[str, ...] = ()


SETS = {
    "big": Shape(1, 2, slices=200, size=512, families=("MUELLER", "GARCIA")),
    "small": Shape(2, 10, slices=50, size=64, families=("JANSSEN", "ROSSI")),
    "qido": Shape(3, 50, studies=2, series=2, slices=25, size=64,
                  families=("KOWALSKI", "NGUYEN", "TANAKA", "OKAFOR", "SILVA")),
    "cr": Shape(4, 4, radiographs=4, families=("HANSEN", "IVANOV")),
}
GIVEN = ("ANNA", "JOHN", "MARIA", "PETER", "LUCIA", "AHMED", "SOFIA", "DAVID", "ELENA", "MARK")
INSTITUTIONS = (("SAINT ELSEWHERE GENERAL HOSPITAL", "12 Harbour Road^^Springfield^^4021^US"),
                ("UNIVERSITY CLINIC NORTH", "Klinikstrasse 5^^Musterstadt^^10115^DE"))
PHYSICIANS = ("HOUSE^GREGORY^^DR", "QUINN^MICHAELA^^DR", "CARTER^JOHN^^DR", "GREY^MEREDITH^^DR")
CT_MODELS = (("SIEMENS", "SOMATOM Definition AS+", "syngo CT VA48A"),
             ("GE MEDICAL SYSTEMS", "Revolution CT", "revo_ct_22ex.5"),
             ("Philips", "Brilliance 64", "4.1.6"))
CT_PROTOCOLS = (("CHEST", "Thorax 1.0 B30f", "THORAX ROUTINE", "B30f"),
                ("ABDOMEN", "Abdomen 1.0 B31f venous", "ABDOMEN PV", "B31f"),
                ("CHEST", "Lung 1.0 B70f", "THORAX ROUTINE", "B70f"))


def _uid(seed: int, *parts: object) -> str:
    # one joined string: pydicom concatenates entropy sources, so (1, 15) and (11, 5) collide
    return generate_uid(prefix=UID_ROOT, entropy_srcs=[":".join(map(str, (seed, *parts)))])


def _rng(seed: int, *parts: int) -> np.random.Generator:
    return np.random.default_rng([seed, *parts])


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = "RICORD_BENCH"
    meta.SourceApplicationEntityTitle = "HOSPITAL_PACS"
    return meta


def _patient(seed: int, name: str, shape: Shape, index: int) -> dict:
    rng = _rng(seed, shape.code, 1, index)
    born = dt.date(1935, 1, 1) + dt.timedelta(days=int(rng.integers(0, 70 * 365)))
    families = shape.families
    if name == "qido":   # ten patients per family name
        family, given = families[index // 10 % len(families)], GIVEN[index % 10]
    else:
        family, given = families[index % len(families)], GIVEN[index // len(families) % 10]
    return {
        "id": f"MRN{shape.code}{seed % 1000:03d}{index:05d}",
        "name": f"{family}^{given}",
        "birth": born.strftime("%Y%m%d"),
        "sex": "F" if rng.integers(2) else "M",
        "phone": f"+1-555-{int(rng.integers(1000000, 9999999))}",
        "address": f"{int(rng.integers(1, 999))} Elm Street^^Springfield^^"
                   f"{int(rng.integers(10000, 99999))}^US",
        "size": f"{rng.uniform(1.5, 1.95):.2f}",
        "weight": f"{rng.uniform(45, 120):.1f}",
        "studies": [],
    }


def _study(seed: int, shape: Shape, patient: dict, index: int, number: int) -> dict:
    rng = _rng(seed, shape.code, 2, index, number)
    day = dt.date(2019, 1, 1) + dt.timedelta(days=int(rng.integers(0, 6 * 365)))
    return {
        "uid": _uid(seed, shape.code, "study", index, number),
        "date": day.strftime("%Y%m%d"),
        "time": f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}"
                f"{int(rng.integers(0, 60)):02d}.{int(rng.integers(0, 999999)):06d}",
        "accession": f"A{shape.code}{seed % 1000:03d}{index:05d}{number:02d}",
        "study_id": str(int(rng.integers(1000, 99999))),
        "referring": PHYSICIANS[int(rng.integers(len(PHYSICIANS)))],
        "institution": INSTITUTIONS[int(rng.integers(len(INSTITUTIONS)))],
        "series": [],
    }


def _identify(ds: Dataset, patient: dict, study: dict, description: str) -> None:
    """The patient, study and equipment attributes a hospital's object carries."""
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = patient["name"]
    ds.PatientID = patient["id"]
    ds.IssuerOfPatientID = "SEGH-MRN"
    ds.PatientBirthDate = patient["birth"]
    ds.PatientSex = patient["sex"]
    ds.PatientAddress = patient["address"]
    ds.PatientTelephoneNumbers = patient["phone"]
    ds.PatientComments = f"contact {patient['phone']}"
    ds.PatientAge = f"{int(study['date'][:4]) - int(patient['birth'][:4]):03d}Y"
    ds.PatientSize = patient["size"]
    ds.PatientWeight = patient["weight"]
    ds.StudyInstanceUID = study["uid"]
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study["date"]
    ds.StudyTime = study["time"]
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = study["time"][:6]
    ds.AccessionNumber = study["accession"]
    ds.StudyID = study["study_id"]
    ds.StudyDescription = description
    ds.ReferringPhysicianName = study["referring"]
    ds.NameOfPhysiciansReadingStudy = PHYSICIANS[0]
    ds.OperatorsName = "TECH^ROBIN"
    ds.InstitutionName, ds.InstitutionAddress = study["institution"]
    ds.InstitutionalDepartmentName = "RADIOLOGY"
    request = Dataset()
    request.RequestedProcedureID = study["accession"][-6:]
    request.ScheduledProcedureStepID = "SPS" + study["accession"][-6:]
    request.RequestedProcedureDescription = description
    request.AccessionNumber = study["accession"]
    request.StudyInstanceUID = study["uid"]
    ds.RequestAttributesSequence = Sequence([request])
    block = ds.private_block(0x0009, "BENCH PHI", create=True)
    block.add_new(0x01, "LO", patient["name"].replace("^", " "))
    block.add_new(0x02, "LO", patient["id"])


_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def ct_phantom(rng: np.random.Generator, size: int, z: float) -> np.ndarray:
    """Stored values of a CT slice (HU + 1024): body, fat, lungs varying along z, spine,
    table, Gaussian noise."""
    if size not in _GRIDS:
        y, x = np.mgrid[0:size, 0:size].astype(np.float32)
        _GRIDS[size] = ((x - size / 2) / (size / 2), (y - size / 2) / (size / 2))
    xn, yn = _GRIDS[size]
    hu = np.full((size, size), -1000.0, dtype=np.float32)
    body = (xn / 0.85) ** 2 + (yn / 0.62) ** 2 <= 1.0
    hu[body] = 40.0
    hu[body & ((xn / 0.80) ** 2 + (yn / 0.57) ** 2 > 1.0)] = -90.0
    lung = max(0.0, float(np.sin(np.pi * z)))
    if lung > 0.05:
        for side in (-0.38, 0.38):
            hu[((xn - side) / (0.28 * lung + 0.02)) ** 2
               + ((yn + 0.05) / (0.42 * lung + 0.02)) ** 2 <= 1.0] = -820.0
    hu[(xn / 0.07) ** 2 + ((yn - 0.42) / 0.07) ** 2 <= 1.0] = 700.0
    hu[(yn > 0.72) & (yn < 0.76) & (np.abs(xn) < 0.9)] = 200.0
    hu += rng.standard_normal((size, size), dtype=np.float32) * 12.0
    return (np.clip(hu, -1024, 3071) + 1024).astype("<i2")


def chest_radiograph(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A 12-bit radiograph-like image (MONOCHROME2: dense is bright)."""
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    xn, yn = (x - cols / 2) / (cols / 2), (y - rows / 2) / (rows / 2)
    img = np.full((rows, cols), 300.0, dtype=np.float32)
    thorax = (xn / 0.8) ** 2 + (yn / 0.9) ** 2 <= 1.0
    img[thorax] = 2600.0
    for side in (-0.38, 0.38):
        img[((xn - side) / 0.3) ** 2 + ((yn + 0.05) / 0.6) ** 2 <= 1.0] = 1100.0
    img[(np.abs(xn) < 0.12) & (yn > -0.7) & (yn < 0.6)] = 3000.0
    img[((xn - 0.1) / 0.25) ** 2 + ((yn - 0.25) / 0.22) ** 2 <= 1.0] = 2900.0
    for k in range(9):
        img[(np.abs(yn + 0.7 - k * 0.16 - 0.08 * xn**2) < 0.018) & thorax] += 500.0
    img += rng.standard_normal((rows, cols), dtype=np.float32) * 25.0
    return np.clip(img, 0, 4095).astype("<u2")


def _ct_set(seed: int, name: str, shape: Shape, out: Path) -> list[dict]:
    patients = []
    for p in range(shape.patients):
        patient = _patient(seed, name, shape, p)
        for j in range(shape.studies):
            study = _study(seed, shape, patient, p, j)
            rng = _rng(seed, shape.code, 3, p, j)
            body_part, series_description, protocol, kernel = CT_PROTOCOLS[
                int(rng.integers(len(CT_PROTOCOLS)))]
            model = CT_MODELS[int(rng.integers(len(CT_MODELS)))]
            description = f"CT {body_part.title()} with contrast"
            frame_of_reference = _uid(seed, shape.code, "for", p, j)
            for k in range(shape.series):
                series_uid = _uid(seed, shape.code, "series", p, j, k)
                thickness = [1.0, 1.25, 2.5][int(rng.integers(3))] if shape.size >= 256 else 5.0
                spacing = round(float(rng.uniform(0.6, 0.9)) * 512 / shape.size, 4)
                z0 = -float(rng.integers(50, 300))
                folder = out / f"p{p:03d}" / f"st{j}" / f"se{k}"
                folder.mkdir(parents=True, exist_ok=True)
                series = {"uid": series_uid, "number": k + 1, "modality": "CT", "files": []}
                for n in range(shape.slices):
                    sop = _uid(seed, shape.code, "sop", p, j, k, n)
                    ds = Dataset()
                    ds.file_meta = _file_meta(CT_IMAGE, sop)
                    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
                    ds.InstanceCreationDate = study["date"]
                    ds.InstanceCreationTime = study["time"][:6]
                    ds.SOPClassUID = CT_IMAGE
                    ds.SOPInstanceUID = sop
                    ds.Modality = "CT"
                    _identify(ds, patient, study, description)
                    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = model
                    ds.StationName = f"CTAWP{p % 7}{j}{k:03d}"
                    ds.DeviceSerialNumber = f"SN{p:05d}"
                    ds.SeriesDescription = series_description
                    ds.ProtocolName = protocol
                    ds.PerformingPhysicianName = PHYSICIANS[1]
                    ds.BodyPartExamined = body_part
                    ds.ScanOptions = "HELICAL MODE"
                    ds.SliceThickness = thickness
                    ds.KVP = 120
                    ds.DataCollectionDiameter = 500
                    ds.ReconstructionDiameter = round(spacing * shape.size, 2)
                    ds.DistanceSourceToDetector = 1085.6
                    ds.DistanceSourceToPatient = 595
                    ds.GantryDetectorTilt = 0
                    ds.TableHeight = 145
                    ds.RotationDirection = "CW"
                    ds.ExposureTime = 500
                    ds.XRayTubeCurrent = int(rng.integers(80, 400))
                    ds.Exposure = int(rng.integers(50, 300))
                    ds.FilterType = "FLAT"
                    ds.ConvolutionKernel = kernel
                    ds.PatientPosition = "HFS"
                    ds.SeriesInstanceUID = series_uid
                    ds.SeriesNumber = k + 1
                    ds.AcquisitionNumber = 1
                    ds.InstanceNumber = n + 1
                    z = round(z0 - n * thickness, 4)
                    half = round(-spacing * shape.size / 2, 4)
                    ds.ImagePositionPatient = [half, half, z]
                    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
                    ds.FrameOfReferenceUID = frame_of_reference
                    ds.PositionReferenceIndicator = ""
                    ds.SliceLocation = z
                    ds.SamplesPerPixel = 1
                    ds.PhotometricInterpretation = "MONOCHROME2"
                    ds.Rows = ds.Columns = shape.size
                    ds.PixelSpacing = [spacing, spacing]
                    ds.BitsAllocated = ds.BitsStored = 16
                    ds.HighBit = 15
                    ds.PixelRepresentation = 1
                    ds.WindowCenter = [40, -600]
                    ds.WindowWidth = [400, 1500]
                    ds.WindowCenterWidthExplanation = ["WINDOW1", "WINDOW2"]
                    ds.RescaleIntercept = -1024
                    ds.RescaleSlope = 1
                    ds.RescaleType = "HU"
                    ds.BurnedInAnnotation = "NO"
                    ds.LossyImageCompression = "00"
                    pixels = ct_phantom(rng, shape.size, n / max(1, shape.slices - 1))
                    ds.PixelData = pixels.tobytes()
                    path = folder / f"{n + 1:04d}.dcm"
                    ds.save_as(path, enforce_file_format=True)
                    series["files"].append(str(path.relative_to(out)))
                study["series"].append(series)
            study.pop("institution")
            patient["studies"].append(study)
        patients.append(patient)
    return patients


def _radiograph_set(seed: int, name: str, shape: Shape, out: Path) -> list[dict]:
    patients = []
    for i in range(shape.radiographs):
        patient = _patient(seed, name, shape, i)
        study = _study(seed, shape, patient, i, 0)
        rng = _rng(seed, shape.code, 4, i)
        dx = i % 2 == 1
        sop_class, modality = (DX_IMAGE, "DX") if dx else (CR_IMAGE, "CR")
        sop = _uid(seed, shape.code, "sop", i)
        series_uid = _uid(seed, shape.code, "series", i)
        ds = Dataset()
        ds.file_meta = _file_meta(sop_class, sop)
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop
        ds.Modality = modality
        _identify(ds, patient, study, "XR CHEST PA")
        ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = (
            ("Carestream Health", "DRX-Evolution", "5.7") if dx else ("Agfa", "CR 85-X", "2.0"))
        ds.StationName = f"XRROOM{i:03d}"
        ds.DeviceSerialNumber = f"SNXR{i:04d}"
        ds.SeriesDescription = "Chest PA"
        ds.ProtocolName = "CHEST PA"
        ds.BodyPartExamined = "CHEST"
        ds.ViewPosition = "PA"
        ds.PatientOrientation = ["L", "F"]
        ds.KVP = 125
        ds.ExposureTime = 8
        ds.XRayTubeCurrent = 320
        ds.Exposure = 3
        ds.DistanceSourceToDetector = 1800
        ds.ImagerPixelSpacing = [0.175, 0.175]
        ds.PixelSpacing = [0.175, 0.175]
        if dx:
            ds.PresentationIntentType = "FOR PRESENTATION"
            ds.DetectorType = "SCINTILLATOR"
            ds.PixelIntensityRelationship = "LOG"
            ds.PixelIntensityRelationshipSign = 1
            ds.RescaleIntercept = 0
            ds.RescaleSlope = 1
            ds.RescaleType = "US"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 1
        ds.InstanceNumber = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = 2500, 2000
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = 2048
        ds.WindowWidth = 4096
        ds.BurnedInAnnotation = "NO"
        ds.PixelData = chest_radiograph(rng, 2500, 2000).tobytes()
        folder = out / f"xr{i:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "0001.dcm"
        ds.save_as(path, enforce_file_format=True)
        study.pop("institution")
        study["series"].append({"uid": series_uid, "number": 1, "modality": modality,
                                "files": [str(path.relative_to(out))]})
        patient["studies"].append(study)
        patients.append(patient)
    return patients


@dataclass
class CorpusSet:
    """One set of a generated corpus: its folder, files and manifest."""

    name: str
    root: Path
    manifest: dict

    @property
    def patients(self) -> list[dict]:
        return self.manifest["patients"]

    @property
    def files(self) -> list[Path]:
        return [self.root / f for p in self.patients for s in p["studies"]
                for se in s["series"] for f in se["files"]]

    @property
    def total_bytes(self) -> int:
        return self.manifest["bytes"]


def generate(out: Path, seed: int = 1234, names: tuple[str, ...] = tuple(SETS),
             log=print) -> dict[str, CorpusSet]:
    """Make (or reuse) the named sets under `out`; returns them by name."""
    out.mkdir(parents=True, exist_ok=True)
    sets = {}
    for name in names:
        root = out / name
        manifest_path = root / "manifest.json"
        if manifest_path.exists():
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("version") == VERSION and manifest.get("seed") == seed:
                sets[name] = CorpusSet(name, root, manifest)
                continue
        started = time.monotonic()
        root.mkdir(parents=True, exist_ok=True)
        shape = SETS[name]
        maker = _radiograph_set if shape.radiographs else _ct_set
        patients = maker(seed, name, shape, root)
        corpus_set = CorpusSet(name, root, {"version": VERSION, "seed": seed, "set": name,
                                            "patients": patients, "bytes": 0})
        digest = hashlib.sha256()
        for path in corpus_set.files:
            data = path.read_bytes()
            corpus_set.manifest["bytes"] += len(data)
            digest.update(data)
        corpus_set.manifest["files"] = len(corpus_set.files)
        corpus_set.manifest["sha256"] = digest.hexdigest()
        manifest_path.write_text(json.dumps(corpus_set.manifest, indent=1))
        log(f"corpus {name}: {corpus_set.manifest['files']} files, "
            f"{corpus_set.total_bytes / 1e6:.1f} MB in {time.monotonic() - started:.1f} s")
        sets[name] = corpus_set
    return sets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--sets", nargs="*", choices=sorted(SETS), default=list(SETS))
    args = parser.parse_args()
    for name, corpus_set in generate(args.out, args.seed, tuple(args.sets)).items():
        print(f"{name}: {len(corpus_set.files)} files, {corpus_set.total_bytes / 1e6:.1f} MB, "
              f"sha256 {corpus_set.manifest['sha256'][:16]} ({corpus_set.root})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
