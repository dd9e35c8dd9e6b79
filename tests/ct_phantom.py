"""A CT phantom series with consistent geometry, for the viewer and label tests."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

# The phantom, in image pixels of a SIZE x SIZE slice: a soft-tissue disc in the centre and a
# small bone disc in the upper left quadrant (to see that the image is neither flipped nor
# mirrored), in air.
SIZE = 256
DISC = (128, 128, 60)  # column, row, radius
MARKER = (64, 64, 18)
AIR_HU, DISC_HU, MARKER_HU = -1000, 100, 1000
WINDOW = (40, 400)  # soft tissue: -160 HU black, 240 HU white


def ct_series(patient_id: str, patient_name: str, study_date: str, slices: int,
              size: int = SIZE, seed: int = 0) -> list[Dataset]:
    """A CT series with consistent geometry: axial slices 2.5 mm apart, 0.7 mm pixels."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:size, 0:size]
    scale = size / SIZE
    hu = np.full((size, size), AIR_HU, dtype=np.int32)
    for (x, y, r), value in ((DISC, DISC_HU), (MARKER, MARKER_HU)):
        inside = (columns - x * scale) ** 2 + (rows - y * scale) ** 2 <= (r * scale) ** 2
        hu[inside] = value
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    spacing, thickness = 0.7, 2.5
    origin = -spacing * size / 2
    datasets = []
    for number in range(1, slices + 1):
        z = -100.0 + (number - 1) * thickness
        noisy = hu + rng.integers(-8, 9, size=hu.shape)
        stored = (noisy + 1024).clip(0, 4095).astype(np.uint16)
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "093000"
        ds.AccessionNumber = f"ACC{seed:05d}"
        ds.StudyID = f"S{seed}"
        ds.Modality = "CT"
        ds.Manufacturer = "ACME MEDICAL"
        ds.StudyDescription = "CT CHEST"
        ds.SeriesDescription = "AXIAL 2.5"
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19600101"
        ds.PatientSex = "F"
        ds.BodyPartExamined = "CHEST"
        ds.KVP = 120
        ds.SliceThickness = thickness
        ds.SeriesNumber = 2
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [origin, origin, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = z
        ds.PixelSpacing = [spacing, spacing]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = WINDOW
        ds.PixelData = stored.tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        part10 = io.BytesIO()
        ds.save_as(part10, enforce_file_format=True)
        datasets.append(pydicom.dcmread(io.BytesIO(part10.getvalue())))
    return datasets
