"""What researchers get of the clinical rows: the filters of `GET /api/clinical` (typed by the
columns' kinds), the output columns (the archive's names or RICORD's published spreadsheet
names), and CSV text. Pure."""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ricord_archive.clinical import columns as col

SITEID = "SITEID"
IDENTITY_COLUMNS = (SITEID, col.PATIENT_ID, col.STUDY_UID, col.ACCESSION, col.STUDY_DATE)
OUTPUT_COLUMNS = (*IDENTITY_COLUMNS, *col.BUILT_IN)
# The names of RICORD's published clinical spreadsheets; the others keep the archive's name.
RICORD_NAMES = {
    col.PATIENT_ID: "Anon MRN", col.AGE: "Anon Age", col.SEX: "Anon Sex",
    col.STUDY_UID: "Anon Study UID", col.STUDY_DATE: "Anon TCIA Study Date",
    col.TEST_RESULT: "Result",
}
CONTROL = frozenset({"site", "columns"})
_KINDS = {col.STUDY_DATE: "date", col.AGE: "number", col.SEX: "category",
          col.TEST_METHOD: "category", col.TEST_RESULT: "category", col.TEST_DATE: "date"}


class FilterError(ValueError):
    """A filter the archive cannot apply: 400."""


@dataclass(frozen=True)
class ColumnFilter:
    """One clinical column's condition: any of `values`, or within [low, high] (inclusive,
    either side open). `index_column` for a built-in column, None for a declared one."""

    name: str
    index_column: str | None
    kind: str
    values: tuple[Any, ...] = ()
    low: Any = None
    high: Any = None


@dataclass(frozen=True)
class ClinicalFilter:
    """Which examinations: at a site (its index id), of a pseudonym, of a de-identified study,
    and matching every column condition (StudyDate: a range of shifted dates)."""

    site_id: int | None = None
    pseudonym: str | None = None
    study_uid: str | None = None
    columns: tuple[ColumnFilter, ...] = ()


def merge_declared(declarations: Iterable[col.Column]) -> dict[str, col.Column]:
    """The declared columns of several sites by name; one name must keep one kind."""
    merged: dict[str, col.Column] = {}
    for column in declarations:
        known = merged.get(column.name)
        if known is not None and known.kind != column.kind:
            raise FilterError(f"column {column.name!r} has different types at different "
                              "sites: filter one site (?site=)")
        merged.setdefault(column.name, column)
    return merged


def _range(text: str, read: Any) -> tuple[Any, Any]:
    low, dash, high = text.partition("-") if not text.startswith("-") else ("", "-", text[1:])
    try:
        if not dash:
            value = read(text)
            return value, value
        return (read(low) if low else None), (read(high) if high else None)
    except col.CellError as exc:
        raise FilterError(f"a range filter takes A-B, A- or -B: {exc}") from None


def _filter(name: str, value: str, declared: Mapping[str, col.Column]) -> ColumnFilter:
    builtin = "exam_study_date" if name == col.STUDY_DATE else col.BUILT_IN.get(name)
    if builtin is not None:
        kind, read = _KINDS[name], col.BUILT_IN_READERS.get(name)
    else:
        column = declared[name]
        kind, read = column.kind, col.reader(column)
    if kind in ("number", "date"):
        low, high = _range(value, col.number if kind == "number" else col.date)
        return ColumnFilter(name, builtin, kind, low=low, high=high)
    assert read is not None  # only the study date, a range, has no reader
    try:
        values = tuple(read(v) for v in value.split(","))
    except col.CellError as exc:
        raise FilterError(f"filter {name}: {exc}") from None
    return ColumnFilter(name, builtin, kind, values=values)


def clinical_keys(declared: Mapping[str, col.Column]) -> frozenset[str]:
    """The filter keys that name clinical columns (built-in or declared), e.g. to tell them
    from the QIDO-RS keys of a cohort's filters."""
    return frozenset((*col.BUILT_IN, *declared))


def parse_filters(
    params: Iterable[tuple[str, str]], site_id: int | None,
    declared: Mapping[str, col.Column],
) -> ClinicalFilter:
    """The filter of a request's parameters (`site` and `columns` are not filters)."""
    pseudonym = study_uid = None
    conditions: list[ColumnFilter] = []
    for name, value in params:
        if name in CONTROL:
            continue
        if name == col.PATIENT_ID:
            pseudonym = value
        elif name == col.STUDY_UID:
            study_uid = value
        elif name in _KINDS or name in declared:
            conditions.append(_filter(name, value, declared))
        else:
            raise FilterError(f"unknown filter {name!r}: filters are PatientID, "
                              "StudyInstanceUID, StudyDate, site and the clinical columns")
    return ClinicalFilter(site_id, pseudonym, study_uid, tuple(conditions))


def column_names(extra: Iterable[str], ricord: bool) -> list[str]:
    """The header of an export: the archive's columns, then the declared ones."""
    names = [*OUTPUT_COLUMNS, *sorted(extra)]
    return [RICORD_NAMES.get(n, n) for n in names] if ricord else names


def renamed(row: Mapping[str, Any], ricord: bool) -> dict[str, Any]:
    """A row under the export's column names, dates as YYYYMMDD."""
    out = {}
    for name, value in row.items():
        if isinstance(value, dt.date):
            value = value.strftime("%Y%m%d")
        out[RICORD_NAMES.get(name, name) if ricord else name] = value
    return out


def to_csv(header: list[str], rows: Iterable[Mapping[str, Any]]) -> str:
    """CSV text, booleans as TRUE/FALSE, blanks empty."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if row.get(h) is None else
                         ("TRUE" if row[h] else "FALSE") if isinstance(row[h], bool) else row[h]
                         for h in header])
    return buffer.getvalue()
