"""The columns of a clinical sheet: the identifiers, the built-in clinical columns and their
types, and the columns a site declares in a MAP.toml. Pure.

A cell is converted to its typed value or refused with a fixed reason (never the value).
"""

from __future__ import annotations

import datetime as dt
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ricord_archive.deid.rules import cap_age
from ricord_archive.dicom.uids import is_uid

_SETTINGS = {"number": {"type", "unit"}, "category": {"type", "values"}, "boolean": {"type"},
             "date": {"type"}}  # what a column map may say of each kind
KINDS = tuple(_SETTINGS)

# identifier columns (originals: mapped through the keyed functions, never stored)
PATIENT_ID, ISSUER, ACCESSION, STUDY_UID, STUDY_DATE = (
    "PatientID", "IssuerOfPatientID", "AccessionNumber", "StudyInstanceUID", "StudyDate",
)
IDENTIFIERS = (PATIENT_ID, ISSUER, ACCESSION, STUDY_UID, STUDY_DATE)
ALIASES = {"MRN": PATIENT_ID}

# built-in clinical columns: name -> index column
AGE, SEX, TEST_METHOD, TEST_RESULT, TEST_DATE = (
    "Age", "Sex", "TestMethod", "TestResult", "TestDate",
)
BUILT_IN = {AGE: "age", SEX: "sex", TEST_METHOD: "test_method", TEST_RESULT: "test_result",
            TEST_DATE: "test_date"}

_MAX_AGE = 150
_TRUE = frozenset({"TRUE", "YES", "Y", "1"})
_FALSE = frozenset({"FALSE", "NO", "N", "0"})


class CellError(ValueError):
    """A cell that cannot be read as its column's type; the message is a fixed reason."""


class ColumnMapError(ValueError):
    """A MAP.toml that declares a column badly; the message names the column, never a value."""


@dataclass(frozen=True)
class Column:
    """A declared column: `kind` number (with `unit`), category (with `allowed` values),
    boolean, or date (shifted like the images)."""

    name: str
    kind: str
    unit: str | None = None
    allowed: tuple[str, ...] = ()


def parse_column_map(text: str) -> dict[str, Column]:
    """The columns a MAP.toml declares:

        [columns.Temperature]
        type = "number"
        unit = "Cel"
        [columns.Severity]
        type = "category"
        values = ["mild", "moderate", "severe"]
        [columns.ICU]
        type = "boolean"
        [columns.AdmissionDate]
        type = "date"
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ColumnMapError(f"the column map is not valid TOML: {exc}") from None
    unknown = set(document) - {"columns"}
    if unknown:
        raise ColumnMapError(f"the column map has unknown tables: {', '.join(sorted(unknown))}")
    declared = document.get("columns", {})
    if not isinstance(declared, dict):
        raise ColumnMapError("[columns] must be a table of column tables")
    return {name: _column(name, spec) for name, spec in declared.items()}


def _column(name: str, spec: Any) -> Column:
    if name in IDENTIFIERS or name in ALIASES or name in BUILT_IN:
        raise ColumnMapError(f"column {name!r} is built in; it cannot be declared")
    if not isinstance(spec, dict) or spec.get("type") not in KINDS:
        raise ColumnMapError(f"column {name!r}: type must be one of {', '.join(KINDS)}")
    kind = spec["type"]
    if set(spec) - _SETTINGS[kind]:
        raise ColumnMapError(
            f"column {name!r}: a {kind} takes only {', '.join(sorted(_SETTINGS[kind]))}"
        )
    unit = spec.get("unit")
    if kind == "number" and not (isinstance(unit, str) and unit.strip()):
        raise ColumnMapError(f"column {name!r}: a number needs its unit")
    allowed = spec.get("values", [])
    if kind == "category" and (
        not allowed or not all(isinstance(v, str) and v.strip() for v in allowed)
        or len({v.upper() for v in allowed}) != len(allowed)
    ):
        raise ColumnMapError(f"column {name!r}: a category needs its distinct allowed values")
    return Column(name, kind, unit, tuple(allowed))


def text(cell: Any) -> str:
    """A cell as text: numbers as written (12345.0 -> '12345'), stripped; '' when blank."""
    if cell is None:
        return ""
    if isinstance(cell, bool):
        return "TRUE" if cell else "FALSE"
    if isinstance(cell, float) and cell.is_integer():
        return str(int(cell))
    if isinstance(cell, dt.datetime | dt.date):
        raise CellError("a date where text was expected")
    return str(cell).strip()


def identifier(cell: Any) -> str:
    """An identifier (PatientID, IssuerOfPatientID, AccessionNumber) as DICOM would carry it:
    stripped text."""
    return text(cell)


def study_uid(cell: Any) -> str:
    value = text(cell)
    if not is_uid(value):
        raise CellError("not a UID")
    return value


def date(cell: Any) -> dt.date:
    """A date: a spreadsheet date, or text YYYYMMDD or YYYY-MM-DD."""
    if isinstance(cell, dt.datetime):
        return cell.date()
    if isinstance(cell, dt.date):
        return cell
    value = text(cell)
    for layout in ("%Y%m%d", "%Y-%m-%d"):
        try:
            return dt.datetime.strptime(value, layout).date()
        except ValueError:
            continue
    raise CellError("not a date (YYYYMMDD or YYYY-MM-DD)")


def _number(cell: Any) -> float:
    if isinstance(cell, bool):
        raise CellError("not a number")
    if isinstance(cell, int | float):
        value = float(cell)
    else:
        try:
            value = float(text(cell))
        except ValueError:
            raise CellError("not a number") from None
    if not math.isfinite(value):
        raise CellError("not a number")
    return value


def number(cell: Any) -> int | float:
    value = _number(cell)
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


def age(cell: Any) -> int:
    """Whole years; over 89 becomes 90, as the de-identifier caps the images' ages."""
    value = _number(cell)
    if not value.is_integer() or not 0 <= value <= _MAX_AGE:
        raise CellError("not an age in whole years")
    return int(cap_age(f"{int(value):03d}Y")[:3])


def _choice(cell: Any, choices: dict[str, str], reason: str) -> str:
    value = choices.get(text(cell).upper())
    if value is None:
        raise CellError(reason)
    return value


_SEX = {"M": "M", "F": "F", "O": "O", "U": "U", "MALE": "M", "FEMALE": "F", "OTHER": "O",
        "UNKNOWN": "U"}
_METHODS = {m: m for m in ("PCR", "SEROLOGY", "CLINICAL")}
_RESULTS = {**{r: r for r in ("POSITIVE", "NEGATIVE", "INDETERMINATE")},
            "DETECTED": "POSITIVE", "NOT DETECTED": "NEGATIVE"}


def sex(cell: Any) -> str:
    return _choice(cell, _SEX, "not one of M, F, O, U")


def test_method(cell: Any) -> str:
    return _choice(cell, _METHODS, "not one of PCR, SEROLOGY, CLINICAL")


def test_result(cell: Any) -> str:
    return _choice(cell, _RESULTS, "not one of POSITIVE, NEGATIVE, INDETERMINATE")


def boolean(cell: Any) -> bool:
    if isinstance(cell, bool):
        return cell
    value = text(cell).upper()
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise CellError("not a boolean (true/false, yes/no, 1/0)")


def reader(column: Column) -> Callable[[Any], Any]:
    """The cell reader of a declared column (a date reader returns the unshifted date)."""
    if column.kind == "number":
        return number
    if column.kind == "boolean":
        return boolean
    if column.kind == "date":
        return date
    choices = {v.upper(): v for v in column.allowed}
    return lambda cell: _choice(cell, choices, "not one of the declared values")


BUILT_IN_READERS: dict[str, Callable[[Any], Any]] = {
    AGE: age, SEX: sex, TEST_METHOD: test_method, TEST_RESULT: test_result, TEST_DATE: date,
}
