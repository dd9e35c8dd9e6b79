"""Reading a clinical sheet (CSV, or an Excel workbook through openpyxl) from its bytes into
checked rows, and keying them like the images. Pure: no files, no database.

`read_table` gives the header and the raw cells; `parse_sheet` checks the header (every column
built in or declared) and each row (typed cells, an examination named), refusing by row and
column with a fixed reason, never a value; `keyed` maps a row's original identifiers and dates
through the keyed functions ingest uses, once the patient's date offset is known.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import zipfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from openpyxl import load_workbook
from openpyxl.utils import get_column_letter
from openpyxl.utils.exceptions import InvalidFileException

from ricord_archive.clinical import columns as col
from ricord_archive.deid.keys import Keyring
from ricord_archive.deid.rules import keyed_accession, keyed_uid, shift_date

CSV, XLSX = "text/csv", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
_EARLIEST, _LATEST = dt.date(1900, 1, 1), dt.date(2200, 1, 1)

# refusal reasons (fixed labels, counted in the summary)
MISSING_PATIENT_ID = "missing-patient-id"
MISSING_EXAMINATION = "missing-examination"
INVALID_VALUE = "invalid-value"
DUPLICATE_EXAMINATION = "duplicate-examination"


class SheetError(ValueError):
    """A sheet that cannot be imported at all; the message names columns by position, never
    by a value."""


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[tuple[int, list[Any]]]  # (line number in the sheet, cells)


@dataclass(frozen=True)
class Refusal:
    """A refused row: its line in the sheet (the header is line 1), the column, a reason."""

    line: int
    column: str | None
    reason: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"row": self.line, "column": self.column, "reason": self.reason,
                "message": self.message}


@dataclass(frozen=True)
class SheetRow:
    """A checked row, still holding the originals (in memory only, never stored)."""

    line: int
    patient_id: str
    issuer: str | None
    study_uid: str | None
    accession: str | None
    study_date: dt.date | None
    values: dict[str, Any]  # built-in column -> typed value (None: blank); dates unshifted
    extra: dict[str, Any]  # declared column -> typed value (None: blank); dates unshifted


@dataclass(frozen=True)
class ParsedSheet:
    rows: list[SheetRow]
    refusals: list[Refusal]
    present: frozenset[str]  # the columns the sheet has (canonical names)


@dataclass(frozen=True)
class ExamRow:
    """A row keyed like the images: what the index stores."""

    line: int
    study_uid: str | None  # keyed
    accession: str | None  # keyed
    study_date: dt.date | None  # shifted
    values: dict[str, Any]  # index column (age, sex, ...) -> value, test_date shifted
    extra: dict[str, Any]  # declared column -> JSON value, dates as shifted YYYYMMDD


def read_table(data: bytes, media_type: str, sheet: str | None = None) -> Table:
    """The header and rows of a CSV file (UTF-8) or of a workbook's sheet (the first one
    unless named); fully blank rows are left out."""
    if media_type == XLSX:
        return _xlsx_table(data, sheet)
    if media_type != CSV:
        raise SheetError(f"a clinical sheet is {CSV} or {XLSX}")
    if sheet is not None:
        raise SheetError("a CSV file has no sheets")
    try:
        lines = list(csv.reader(io.StringIO(data.decode("utf-8-sig"), newline="")))
    except UnicodeDecodeError:
        raise SheetError("the CSV file is not UTF-8 text") from None
    except csv.Error:
        raise SheetError("the CSV file cannot be read as CSV") from None
    return _table(lines)


def _xlsx_table(data: bytes, sheet: str | None) -> Table:
    try:
        book = load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except (InvalidFileException, zipfile.BadZipFile, KeyError, OSError, ValueError):
        raise SheetError("the file is not a readable .xlsx workbook") from None
    try:
        if sheet is not None and sheet not in book.sheetnames:
            raise SheetError("the workbook has no sheet of that name")
        chosen = book[sheet] if sheet is not None else book.worksheets[0]
        lines = [list(row) for row in chosen.iter_rows(values_only=True)]
    except SheetError:
        raise
    except Exception:  # openpyxl reads lazily: a broken part surfaces while reading rows
        raise SheetError("the workbook's sheet cannot be read") from None
    finally:
        book.close()
    return _table(lines)


def _blank(cell: Any) -> bool:
    return cell is None or (isinstance(cell, str) and not cell.strip())


def _table(lines: list[list[Any]]) -> Table:
    if not lines:
        raise SheetError("the sheet is empty: a header row is needed")
    header = ["" if c is None else str(c).strip() for c in lines[0]]
    rows = [(number, cells) for number, cells in enumerate(lines[1:], start=2)
            if not all(_blank(c) for c in cells)]
    return Table(header, rows)


def _position(index: int) -> str:
    return f"{index + 1} ({get_column_letter(index + 1)})"


def _header_names(table: Table, declared: Mapping[str, col.Column]) -> dict[int, str]:
    """Column index -> canonical column name; unknown or repeated columns are refused."""
    known = {name.upper(): name for name in (*col.IDENTIFIERS, *col.BUILT_IN, *declared)}
    known.update({alias.upper(): name for alias, name in col.ALIASES.items()})
    names: dict[int, str] = {}
    unknown: list[int] = []
    for index, title in enumerate(table.header):
        name = known.get(title.upper())
        if name is None:
            if title or any(index < len(cells) and not _blank(cells[index])
                            for _, cells in table.rows):
                unknown.append(index)
            continue
        if name in names.values():
            raise SheetError(f"column {_position(index)} repeats another column")
        names[index] = name
    if unknown:
        raise SheetError(
            f"column{'s' if len(unknown) > 1 else ''} {', '.join(map(_position, unknown))} "
            "neither built in nor declared: declare each with a type (number, category, "
            "boolean, date) in the column map, or leave it out; free text is not accepted"
        )
    if col.PATIENT_ID not in names.values():
        raise SheetError("the sheet has no PatientID (or MRN) column")
    if not {col.ACCESSION, col.STUDY_UID} & set(names.values()):
        raise SheetError("the sheet has no AccessionNumber or StudyInstanceUID column")
    return names


def parse_sheet(table: Table, declared: Mapping[str, col.Column]) -> ParsedSheet:
    """Check every row of `table`; `declared`: the columns of the column map."""
    names = _header_names(table, declared)
    readers = {**col.BUILT_IN_READERS,
               **{name: col.reader(column) for name, column in declared.items()}}
    rows: list[SheetRow] = []
    refusals: list[Refusal] = []
    for line, cells in table.rows:
        named = {name: cells[i] if i < len(cells) else None for i, name in names.items()}
        row = _row(line, named, readers)
        if isinstance(row, Refusal):
            refusals.append(row)
        else:
            rows.append(row)
    counts = Counter(_examination(r) for r in rows)
    kept = [r for r in rows if counts[_examination(r)] == 1]
    refusals += [Refusal(r.line, col.STUDY_UID if r.study_uid else col.ACCESSION,
                         DUPLICATE_EXAMINATION, "the examination is named by another row too")
                 for r in rows if counts[_examination(r)] > 1]
    return ParsedSheet(kept, sorted(refusals, key=lambda r: r.line), frozenset(names.values()))


def _examination(row: SheetRow) -> tuple[str, str]:
    return ("uid", row.study_uid) if row.study_uid else ("accession", row.accession or "")


def _row(line: int, named: dict[str, Any], readers: Mapping[str, Any]) -> SheetRow | Refusal:
    typed: dict[str, Any] = {}
    for name, cell in named.items():
        if _blank(cell):
            typed[name] = None
            continue
        read = (col.study_uid if name == col.STUDY_UID
                else col.date if name == col.STUDY_DATE
                else col.identifier if name in col.IDENTIFIERS else readers[name])
        try:
            typed[name] = read(cell)
        except col.CellError as exc:
            return Refusal(line, name, INVALID_VALUE, str(exc))
        if isinstance(typed[name], dt.date) and not _EARLIEST <= typed[name] < _LATEST:
            return Refusal(line, name, INVALID_VALUE, "not a plausible date")
    if not typed.get(col.PATIENT_ID):
        return Refusal(line, col.PATIENT_ID, MISSING_PATIENT_ID, "no PatientID")
    if not typed.get(col.STUDY_UID) and not typed.get(col.ACCESSION):
        return Refusal(line, None, MISSING_EXAMINATION,
                       "neither AccessionNumber nor StudyInstanceUID")
    return SheetRow(
        line, typed[col.PATIENT_ID], typed.get(col.ISSUER) or None,
        typed.get(col.STUDY_UID) or None, typed.get(col.ACCESSION) or None,
        typed.get(col.STUDY_DATE),
        {n: v for n, v in typed.items() if n in col.BUILT_IN},
        {n: v for n, v in typed.items() if n not in col.BUILT_IN and n not in col.IDENTIFIERS},
    )


def patient_key(keys: Keyring, siteid: str, row: SheetRow) -> bytes:
    """The keyed identity of a row's patient, as ingest keys the images' patient. THE one call
    site of the patient key for clinical rows: when the key comes to include the
    IssuerOfPatientID (`row.issuer`, None when the sheet has none), change this line only."""
    return keys.patient_key(siteid, row.patient_id)


def _shifted(day: dt.date, offset_days: int) -> dt.date:
    return dt.datetime.strptime(shift_date(day.strftime("%Y%m%d"), offset_days), "%Y%m%d").date()


def keyed(row: SheetRow, keys: Keyring, siteid: str, offset_days: int) -> ExamRow:
    """The row as the index stores it: the keyed StudyInstanceUID and AccessionNumber the
    de-identifier gives the images, dates shifted by the patient's offset."""
    values = {col.BUILT_IN[n]: (_shifted(v, offset_days) if isinstance(v, dt.date) else v)
              for n, v in row.values.items()}
    extra = {n: (_shifted(v, offset_days).strftime("%Y%m%d") if isinstance(v, dt.date) else v)
             for n, v in row.extra.items()}
    return ExamRow(
        row.line,
        keyed_uid(keys, siteid, row.study_uid) if row.study_uid else None,
        keyed_accession(keys, siteid, row.accession) if row.accession else None,
        _shifted(row.study_date, offset_days) if row.study_date else None,
        values, extra,
    )
