"""What a cohort is downloaded as: the NBIA Data Retriever manifest, metadata.csv, the ZIP's
entry names, and the checks of a cohort's definition. Pure: no I/O.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.uid import UID

from ricord_archive.dicom.json import first_value
from ricord_archive.errors import BadRequest

METADATA_COLUMNS = (
    "Series UID", "Collection", "Subject ID", "Study UID", "Study Description", "Study Date",
    "Series Description", "Manufacturer", "Modality", "SOP Class Name", "SOP Class UID",
    "Number of Images", "File Size", "File Location",
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}")
_MAX_TEXT = 64 * 1024
_MAX_FILTERS = 64


@dataclass(frozen=True)
class CohortSpec:
    """A cohort's definition as a client sent it, checked."""

    name: str
    description: str
    license: str
    citation: str
    filters: dict[str, str]


def _text(body: Mapping[str, Any], key: str) -> str:
    value = body.get(key, "")
    if not isinstance(value, str) or len(value) > _MAX_TEXT or "\x00" in value:
        raise BadRequest(f"{key} must be a string of at most {_MAX_TEXT} characters")
    return value


def parse_spec(body: Any) -> CohortSpec:
    """A cohort from `{name, description, license, citation, filters}`; filters map a QIDO-RS
    key or a clinical column to its value (a string or a number)."""
    if not isinstance(body, dict):
        raise BadRequest("the body is a JSON object {name, description, license, citation, "
                         "filters}")
    unknown = set(body) - {"name", "description", "license", "citation", "filters"}
    if unknown:
        raise BadRequest(f"unknown fields: {', '.join(sorted(k[:32] for k in unknown))}")
    name = body.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BadRequest("name: 1 to 100 letters, digits, spaces, '.', '_' or '-', starting "
                         "with a letter or digit")
    filters = body.get("filters", {})
    if not isinstance(filters, dict) or len(filters) > _MAX_FILTERS:
        raise BadRequest(f"filters: an object of at most {_MAX_FILTERS} keys")
    checked = {}
    for key, value in filters.items():
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise BadRequest(f"filters: the value of {key[:64]!r} must be a string or a number")
        checked[key] = str(value)
    return CohortSpec(name, _text(body, "description"), _text(body, "license"),
                      _text(body, "citation"), checked)


def manifest(download_url: str, name: str, series_uids: Iterable[str]) -> bytes:
    """A TCIA NBIA Data Retriever manifest (.tcia) of the series."""
    lines = [
        f"downloadServerUrl={download_url}", "includeAnnotation=true", "noOfrRetry=4",
        f"databasketId={name}.tcia", "manifestVersion=3.0", "ListOfSeriesToDownload=",
        *series_uids,
    ]
    return ("\n".join(lines) + "\n").encode("ascii")


def series_folder(pseudonym: str, study_uid: str, series_uid: str) -> str:
    return f"{pseudonym}/{study_uid}/{series_uid}"


def entry_names(folders: Sequence[str]) -> list[str]:
    """`<folder>/NNNNNN.dcm` for each object, numbered from 1 within its folder (series)."""
    counts: dict[str, int] = {}
    names = []
    for folder in folders:
        counts[folder] = counts.get(folder, 0) + 1
        names.append(f"{folder}/{counts[folder]:06d}.dcm")
    return names


def _nbia_date(value: str | None) -> str:
    """YYYYMMDD as the Data Retriever writes dates: MM-DD-YYYY."""
    if not value or not re.fullmatch(r"[0-9]{8}", value):
        return ""
    return f"{value[4:6]}-{value[6:8]}-{value[:4]}"


@dataclass(frozen=True)
class SeriesRow:
    """One series of a cohort: its stored documents and what the cohort holds of it."""

    study_json: dict[str, Any]
    series_json: dict[str, Any]
    instance_json: dict[str, Any]  # its first object's
    sop_class_uid: str
    subject: str
    images: int
    size_bytes: int


def _csv(rows: Iterable[Sequence[Any]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerows(rows)
    return out.getvalue().encode("utf-8")


def metadata_csv(collection: str, series: Iterable[SeriesRow]) -> bytes:
    """The Data Retriever's metadata.csv: one row per series."""

    def row(s: SeriesRow) -> list[Any]:
        study_uid = first_value(s.study_json, "0020000D") or ""
        series_uid = first_value(s.series_json, "0020000E") or ""
        return [
            series_uid, collection, s.subject, study_uid,
            first_value(s.study_json, "00081030") or "",
            _nbia_date(first_value(s.study_json, "00080020")),
            first_value(s.series_json, "0008103E") or "",
            first_value(s.instance_json, "00080070") or "",
            first_value(s.series_json, "00080060") or "",
            UID(s.sop_class_uid).name, s.sop_class_uid, s.images, s.size_bytes,
            f"./{series_folder(s.subject, study_uid, series_uid)}",
        ]

    return _csv([METADATA_COLUMNS, *(row(s) for s in series)])
