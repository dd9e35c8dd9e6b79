"""DICOM JSON (PS3.18 Annex F) and the index record of a de-identified dataset. Pure.

Computed once at ingest and stored, so metadata and query answers are reads, not parses.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

BULK_DATA_THRESHOLD = 1024
PIXEL_DATA_TAGS = ("7FE00008", "7FE00009", "7FE00010")  # Float, Double Float, Pixel Data
DICOMWEB_ROOT = "/dicom-web"

# Attributes stored per level: what QIDO-RS returns for a study, a series and an instance
# (PS3.18 Table 6.7.1-2 family), plus the archive's site and subject keys.
STUDY_TAGS = frozenset({
    "00080005", "00080020", "00080030", "00080050", "00080090", "00080201", "00081030",
    "00100010", "00100020", "00100030", "00100040", "00101010", "00101020", "00101030",
    "0020000D", "00200010", "00120030", "00120040", "00120062", "00120063", "00280303",
})
SERIES_TAGS = frozenset({
    "00080005", "00080060", "0008103E", "00080021", "00080031", "00180015", "0020000E",
    "00200011", "00400244", "00400245", "00400275",
})
INSTANCE_TAGS = frozenset({
    "00080005", "00080016", "00080018", "00200013", "00280010", "00280011", "00280100",
    "00280008",
})


def instance_path(study_uid: str, series_uid: str, sop_uid: str) -> str:
    return f"{DICOMWEB_ROOT}/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"


def to_json(dataset: Dataset, bulk_base: str) -> dict[str, Any]:
    """The dataset as DICOM JSON, large binary values replaced by a BulkDataURI under
    `bulk_base` (the instance's path)."""

    def bulk_uri(element: DataElement) -> str:
        return f"{bulk_base}/bulkdata/{int(element.tag):08X}"

    # Not Dataset.to_json_dict(suppress_invalid_tags=True): that switches pydicom's global
    # reading validation to RAISE while it runs (config.strict_reading) and restores it after,
    # so an object being de-identified in another thread meanwhile fails on any value pydicom
    # deems invalid, and two overlapping calls can leave RAISE behind for good.
    document = {}
    for tag in dataset.keys():  # noqa: SIM118 - iterating a Dataset yields its elements
        try:
            document[f"{int(tag):08X}"] = dataset[tag].to_json_dict(
                bulk_data_element_handler=bulk_uri, bulk_data_threshold=BULK_DATA_THRESHOLD
            )
        except Exception:  # an element pydicom cannot express in JSON is left out
            continue
    for key in PIXEL_DATA_TAGS:  # pixel data is bulk data whatever its size: viewers expect it
        if key in document and "InlineBinary" in document[key]:
            uri = f"{bulk_base}/bulkdata/{key}"
            document[key] = {"vr": document[key]["vr"], "BulkDataURI": uri}
    return document


def subset(document: dict[str, Any], tags: frozenset[str]) -> dict[str, Any]:
    return {tag: value for tag, value in document.items() if tag in tags}


def first_value(document: dict[str, Any], tag: str) -> Any:
    values = document.get(tag, {}).get("Value")
    return values[0] if values else None


@dataclass(frozen=True)
class InstanceRecord:
    """What the index needs of one de-identified instance."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str | None
    study_date: dt.date | None
    study_time: dt.time | None
    accession_number: str | None
    study_id: str | None
    patient_sex: str | None
    patient_age: str | None
    series_number: int | None
    pps_start_date: dt.date | None
    pps_start_time: dt.time | None
    instance_number: int | None
    number_of_frames: int
    rows: int | None
    columns: int | None
    samples_per_pixel: int | None
    bits_allocated: int | None


def read_date(text: str) -> dt.date:
    """A DA value as `strptime(text, "%Y%m%d")` reads it, without strptime for plain digits
    (ValueError when it is no date)."""
    if len(text) == 8 and text.isascii() and text.isdigit():  # what strptime reads so
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    return dt.datetime.strptime(text, "%Y%m%d").date()


def _as_date(value: Any) -> dt.date | None:
    try:
        return read_date(str(value)) if value else None
    except ValueError:
        return None


def _as_time(value: Any) -> dt.time | None:
    text = str(value or "").replace(":", "")[:6]
    if len(text) < 6:
        return None
    try:
        if text.isascii() and text.isdigit():  # as strptime reads it, unless a leap second
            return dt.time(int(text[:2]), int(text[2:4]), int(text[4:]))
    except ValueError:
        pass
    try:
        return dt.datetime.strptime(text, "%H%M%S").time()
    except ValueError:
        return None


def _as_int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def index_record(dataset: Dataset) -> InstanceRecord:
    return record_of(lambda keyword: dataset.get(keyword))


def record_of(value: Callable[[str], Any]) -> InstanceRecord:
    """The index record from `value(keyword)`, a top-level value as pydicom gives it (None
    when absent)."""

    def text(keyword: str) -> str | None:
        found = value(keyword)
        return str(found).strip() or None if found not in (None, "") else None

    return InstanceRecord(
        study_uid=str(value("StudyInstanceUID")),
        series_uid=str(value("SeriesInstanceUID")),
        sop_uid=str(value("SOPInstanceUID")),
        sop_class_uid=str(value("SOPClassUID")),
        modality=text("Modality"),
        study_date=_as_date(text("StudyDate")),
        study_time=_as_time(text("StudyTime")),
        accession_number=text("AccessionNumber"),
        study_id=text("StudyID"),
        patient_sex=text("PatientSex"),
        patient_age=text("PatientAge"),
        series_number=_as_int(text("SeriesNumber")),
        pps_start_date=_as_date(text("PerformedProcedureStepStartDate")),
        pps_start_time=_as_time(text("PerformedProcedureStepStartTime")),
        instance_number=_as_int(text("InstanceNumber")),
        number_of_frames=_as_int(text("NumberOfFrames")) or 1,
        rows=_as_int(text("Rows")),
        columns=_as_int(text("Columns")),
        samples_per_pixel=_as_int(text("SamplesPerPixel")),
        bits_allocated=_as_int(text("BitsAllocated")),
    )
