"""The query model and its translation to parameterised SQL. Pure: no database, no sockets.

QIDO-RS parameters and C-FIND identifiers both become a `StudyQuery`; one builder per DICOM
matching type (PS3.4 C.2.2.2) turns it into a WHERE clause. User input only ever travels as a
bind parameter, never as SQL text.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import keyword_for_tag, tag_for_keyword

from ricord_archive.errors import BadRequest

_DATE = re.compile(r"[0-9]{8}")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_MAX_VALUE = 1024


@dataclass(frozen=True)
class Condition:
    """One SQL predicate with its own bind values; `{}` placeholders are numbered later."""

    sql: str
    values: tuple[Any, ...]


def _wildcard_pattern(value: str) -> str:
    """DICOM `*`/`?` to a LIKE pattern; the user's `%`, `_` and `\\` match literally."""
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _is_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def match_single_or_wildcard(column: str, value: str, fold_case: bool = False) -> Condition:
    target = f"upper({column})" if fold_case else column
    probe = value.upper() if fold_case else value
    if value == "*":
        return Condition("TRUE", ())
    if _is_wildcard(value):
        return Condition(f"{target} LIKE {{}}", (_wildcard_pattern(probe),))
    return Condition(f"{target} = {{}}", (probe,))


def _date(text: str, key: str) -> str:
    if not _DATE.fullmatch(text):
        raise BadRequest(f"{key}: expected a date YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
    return text


def match_date_range(column: str, value: str, key: str) -> Condition:
    def as_date(text: str) -> dt.date:
        try:
            return dt.datetime.strptime(_date(text, key), "%Y%m%d").date()
        except ValueError as exc:
            raise BadRequest(f"{key}: not a valid calendar date") from exc

    if "-" not in value:
        return Condition(f"{column} = {{}}", (as_date(value),))
    start, _, end = value.partition("-")
    if not start and not end:
        raise BadRequest(f"{key}: a range needs at least one bound")
    if start and end:
        return Condition(f"{column} BETWEEN {{}} AND {{}}", (as_date(start), as_date(end)))
    if start:
        return Condition(f"{column} >= {{}}", (as_date(start),))
    return Condition(f"{column} <= {{}}", (as_date(end),))


def _split_list(value: str) -> list[str]:
    return [v.strip() for v in re.split(r"[,\\]", value) if v.strip()]


def match_uid_list(column: str, value: str, key: str) -> Condition:
    uids = _split_list(value)
    if not uids or any(len(u) > 64 or not _UID.match(u) for u in uids):
        raise BadRequest(f"{key}: expected one or more UIDs (digits and dots, at most 64)")
    return Condition(f"{column} = ANY({{}})", (uids,))


def match_array_contains(column: str, value: str) -> Condition:
    return Condition(f"{column} && {{}}", (_split_list(value.upper()),))


@dataclass(frozen=True)
class Attribute:
    keyword: str
    build: Callable[[str, str], Condition]


STUDY_ATTRIBUTES: dict[str, Attribute] = {
    a.keyword: a
    for a in (
        # PatientName and PatientID both hold the pseudonym (the ingest sets them equal).
        Attribute("PatientID", lambda v, k: match_single_or_wildcard("s.patient_id", v)),
        Attribute(
            "PatientName", lambda v, k: match_single_or_wildcard("s.patient_id", v, True)
        ),
        Attribute("StudyDate", lambda v, k: match_date_range("s.study_date", v, k)),
        Attribute("StudyInstanceUID", lambda v, k: match_uid_list("s.study_uid", v, k)),
        Attribute(
            "AccessionNumber", lambda v, k: match_single_or_wildcard("s.accession_number", v)
        ),
        Attribute("ModalitiesInStudy", lambda v, k: match_array_contains("s.modalities", v)),
        Attribute(
            "ClinicalTrialSiteID", lambda v, k: match_single_or_wildcard("site.siteid", v)
        ),
        Attribute(
            "ClinicalTrialSubjectID", lambda v, k: match_single_or_wildcard("s.patient_id", v)
        ),
    )
}

_CONTROL_PARAMETERS = frozenset({"limit", "offset", "includefield", "fuzzymatching"})


@dataclass(frozen=True)
class StudyQuery:
    conditions: tuple[Condition, ...] = ()
    limit: int | None = None
    offset: int = 0
    ignored_keys: tuple[str, ...] = field(default=())


def keyword_of(key: str) -> str | None:
    """A query key given as a keyword (`PatientName`) or a tag (`00100010`)."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", key):
        return keyword_for_tag(int(key, 16)) or None
    return key if tag_for_keyword(key) is not None else None


def _int_parameter(name: str, raw: str | None, default: int | None) -> int | None:
    if raw is None or raw == "":
        return default
    if not re.fullmatch(r"[0-9]{1,9}", raw):  # str.isdigit() accepts "²", which int() refuses
        raise BadRequest(f"{name} must be a non-negative integer")
    return int(raw)


def parse_study_query(params: Mapping[str, str], max_limit: int) -> StudyQuery:
    """A study-level query from key=value pairs (QIDO-RS parameters or a C-FIND identifier).

    Empty values are return keys (universal matching). Keys the archive does not match on are
    ignored and reported back, as PS3.18 allows.
    """
    conditions: list[Condition] = []
    ignored: list[str] = []
    for key, value in params.items():
        if key in _CONTROL_PARAMETERS:
            continue
        keyword = keyword_of(key)
        if keyword is None:
            raise BadRequest(f"unknown query key {key[:64]!r}: not a DICOM keyword or tag")
        if len(value) > _MAX_VALUE or "\x00" in value:
            raise BadRequest(f"{keyword}: value too long or containing NUL")
        if value == "":
            continue
        attribute = STUDY_ATTRIBUTES.get(keyword)
        if attribute is None:
            ignored.append(keyword)
            continue
        conditions.append(attribute.build(value, keyword))
    limit = _int_parameter("limit", params.get("limit"), None)
    limit = max_limit if limit is None else min(limit, max_limit)
    offset = _int_parameter("offset", params.get("offset"), 0) or 0
    return StudyQuery(tuple(conditions), limit, offset, tuple(ignored))


def where_clause(conditions: tuple[Condition, ...], first_param: int = 1) -> tuple[str, list]:
    """Number the placeholders and join the predicates with AND."""
    parts: list[str] = []
    values: list[Any] = []
    for condition in conditions:
        numbers = [f"${first_param + len(values) + i}" for i in range(len(condition.values))]
        parts.append(condition.sql.format(*numbers))
        values.extend(condition.values)
    return (" AND ".join(parts) if parts else "TRUE"), values

