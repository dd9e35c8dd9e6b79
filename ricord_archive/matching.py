"""The query model: QIDO-RS parameters and C-FIND identifiers as one `Query`. Pure.

One builder per DICOM matching type (PS3.4 C.2.2.2): single value, wildcard, universal, date,
time and combined date-time ranges, UID lists, and sequence keys. Each produces a SQL predicate
over the index's columns; user input only ever travels as a bind parameter, never as SQL text.
Keys the index keeps no value for (attributes de-identification removes) match nothing but the
universal value; keys the archive does not match on are ignored and reported.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from ricord_archive.errors import BadRequest

_DATE = re.compile(r"[0-9]{8}")
_TIME = re.compile(r"([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:\.([0-9]{1,6}))?)?)?")
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_INTEGER = re.compile(r"[+-]?[0-9]{1,9}")
_MAX_VALUE = 1024
# VRs on which `*` and `?` are wildcards (PS3.4 C.2.2.2.4); elsewhere they match literally.
_WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})


class Level(IntEnum):
    PATIENT = 1
    STUDY = 2
    SERIES = 3
    INSTANCE = 4


@dataclass(frozen=True)
class Condition:
    """One SQL predicate with its own bind values; `{}` placeholders are numbered later."""

    sql: str
    values: tuple[Any, ...] = ()


TRUE = Condition("TRUE")
NOTHING = Condition("FALSE")


def _wildcard_pattern(value: str) -> str:
    """DICOM `*`/`?` to a LIKE pattern; the user's `%`, `_` and `\\` match literally."""
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def match_text(column: str, value: str, fold_case: bool = False) -> Condition:
    """Single value or wildcard matching (on the VRs that allow wildcards)."""
    target = f"upper({column})" if fold_case else column
    probe = value.upper() if fold_case else value
    if "*" in value or "?" in value:
        return Condition(f"{target} LIKE {{}}", (_wildcard_pattern(probe),))
    return Condition(f"{target} = {{}}", (probe,))


def match_fuzzy_name(column: str, value: str) -> Condition:
    """`fuzzymatching=true` for PN: case-insensitive prefix of any name component or word,
    `*` and `?` still wildcards, so fuzzy matching finds whatever exact matching finds."""
    pattern = "".join(
        ".*" if char == "*" else "." if char == "?" else re.escape(char)
        for char in value.upper()
    )
    return Condition(f"upper({column}) ~ {{}}", (f"(^|[\\^ =-]){pattern}",))


def _parse_date(text: str, key: str) -> dt.date:
    if not _DATE.fullmatch(text):
        raise BadRequest(f"{key}: expected a date YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
    try:
        return dt.datetime.strptime(text, "%Y%m%d").date()
    except ValueError as exc:
        raise BadRequest(f"{key}: not a valid calendar date") from exc


def _parse_time(text: str, key: str, *, end: bool = False) -> dt.time:
    """A TM value; a partial time stands for its whole span (start, or end when `end`)."""
    match = _TIME.fullmatch(text.replace(":", ""))
    if not match:
        raise BadRequest(f"{key}: expected a time HH[MM[SS[.FFFFFF]]] or a range of times")
    hour, minute, second, fraction = match.groups()
    fill = 59 if end else 0
    try:
        return dt.time(
            int(hour),
            int(minute) if minute else fill,
            int(second) if second else fill,
            int(fraction.ljust(6, "0")) if fraction else (999999 if end else 0),
        )
    except ValueError as exc:
        raise BadRequest(f"{key}: not a valid time of day") from exc


def _split_range(value: str, key: str) -> tuple[str, str] | None:
    """(start, end) of a range value (either may be empty); None for a single value."""
    if "-" not in value:
        return None
    start, _, end = value.partition("-")
    if (not start and not end) or "-" in end:
        raise BadRequest(f"{key}: a range is START-END, START- or -END")
    return start, end


def _range(column: str, low: Any, high: Any) -> Condition:
    if low is not None and high is not None:
        return Condition(f"{column} BETWEEN {{}} AND {{}}", (low, high))
    if low is not None:
        return Condition(f"{column} >= {{}}", (low,))
    return Condition(f"{column} <= {{}}", (high,))


def match_date(column: str, value: str, key: str) -> Condition:
    bounds = _split_range(value, key)
    if bounds is None:
        return Condition(f"{column} = {{}}", (_parse_date(value, key),))
    start, end = bounds
    return _range(
        column, _parse_date(start, key) if start else None, _parse_date(end, key) if end else None
    )


def match_time(column: str, value: str, key: str) -> Condition:
    bounds = _split_range(value, key)
    if bounds is None:
        return _range(column, _parse_time(value, key), _parse_time(value, key, end=True))
    start, end = bounds
    return _range(
        column,
        _parse_time(start, key) if start else None,
        _parse_time(end, key, end=True) if end else None,
    )


def match_date_time(
    date_column: str, time_column: str, date_value: str, time_value: str,
    date_key: str, time_key: str,
) -> Condition:
    """Combined date-time range matching (PS3.4 C.2.2.2.5.1): StudyDate=D1-D2 with
    StudyTime=T1-T2 means from D1 at T1 to D2 at T2."""
    dates = _split_range(date_value, date_key) or (date_value, date_value)
    times = _split_range(time_value, time_key) or (time_value, time_value)
    start = _parse_time(times[0], time_key) if times[0] else dt.time.min
    end = _parse_time(times[1], time_key, end=True) if times[1] else dt.time.max
    low = dt.datetime.combine(_parse_date(dates[0], date_key), start) if dates[0] else None
    high = dt.datetime.combine(_parse_date(dates[1], date_key), end) if dates[1] else None
    return _range(f"({date_column} + coalesce({time_column}, '00:00'))", low, high)


def _split_list(value: str) -> list[str]:
    return [v.strip() for v in re.split(r"[,\\]", value) if v.strip()]


def match_uids(column: str, value: str, key: str) -> Condition:
    uids = _split_list(value)
    if not uids or any(len(u) > 64 or not _UID.fullmatch(u) for u in uids):
        raise BadRequest(f"{key}: expected one or more UIDs (digits and dots, at most 64)")
    return Condition(f"{column} = ANY({{}})", (uids,))


def match_integer(column: str, value: str, key: str) -> Condition:
    numbers = _split_list(value)
    if not numbers or any(not _INTEGER.fullmatch(n) for n in numbers):
        raise BadRequest(f"{key}: expected an integer")
    return Condition(f"{column} = ANY({{}})", ([int(n) for n in numbers],))


def match_any_of(column: str, value: str) -> Condition:
    """ModalitiesInStudy: matches when the study holds any of the listed values."""
    return Condition(f"{column} && {{}}", (_split_list(value.upper()),))


Builder = Callable[[str, str, str], Condition]  # (column, value, key) -> Condition


@dataclass(frozen=True)
class Key:
    """A matching key: its level, the indexed column (None: never stored), its matching."""

    path: str  # keyword, or dotted keywords for a sequence key
    level: Level
    column: str | None
    build: Builder
    study_column: str | None = None  # the same value denormalised on study, for study and below

    def column_at(self, level: Level) -> str | None:
        return self.study_column if self.study_column and level >= Level.STUDY else self.column


def _text(column: str, value: str, key: str) -> Condition:
    return match_text(column, value)


def _site(column: str, value: str, key: str) -> Condition:
    """ClinicalTrialSiteID: the SITEID, matched on the site table, joined by site id."""
    site = match_text("siteid", value)
    return Condition(f"{column} IN (SELECT id FROM site WHERE {site.sql})", site.values)


def trim_name(value: str) -> str:
    """A PN value without trailing empty components or groups: `DOE^` is the name `DOE`."""
    return "=".join(group.rstrip("^") for group in value.split("=")).rstrip("=")


def _name(column: str, value: str, key: str) -> Condition:
    value = trim_name(value)
    return match_text(column, value, fold_case=True) if value else TRUE


def _modalities(column: str, value: str, key: str) -> Condition:
    return match_any_of(column, value)


_P, _ST, _SE, _I = Level.PATIENT, Level.STUDY, Level.SERIES, Level.INSTANCE
KEYS: dict[str, Key] = {
    k.path: k
    for k in (
        # PatientID, PatientName and ClinicalTrialSubjectID all hold the pseudonym.
        Key("PatientID", _P, "p.pseudonym", _text),
        Key("PatientName", _P, "p.pseudonym", _name),
        Key("ClinicalTrialSubjectID", _P, "p.pseudonym", _text),
        Key("ClinicalTrialSiteID", _P, "p.site_id", _site, "st.site_id"),
        Key("PatientBirthDate", _P, None, match_date),
        Key("IssuerOfPatientID", _P, None, _text),
        Key("OtherPatientIDsSequence.PatientID", _P, None, _text),
        Key("PatientSex", _ST, "st.patient_sex", _text),
        Key("PatientAge", _ST, "st.patient_age", _text),
        Key("StudyInstanceUID", _ST, "st.study_uid", match_uids),
        Key("StudyDate", _ST, "st.study_date", match_date),
        Key("StudyTime", _ST, "st.study_time", match_time),
        Key("AccessionNumber", _ST, "st.accession_number", _text),
        Key("StudyID", _ST, "st.study_id", _text),
        Key("ModalitiesInStudy", _ST, "st.modalities", _modalities),
        Key("ReferringPhysicianName", _ST, None, _name),
        Key("StudyDescription", _ST, None, _text),
        Key("SeriesInstanceUID", _SE, "se.series_uid", match_uids),
        Key("Modality", _SE, "se.modality", _text),
        Key("SeriesNumber", _SE, "se.series_number", match_integer),
        Key("PerformedProcedureStepStartDate", _SE, "se.pps_start_date", match_date),
        Key("PerformedProcedureStepStartTime", _SE, "se.pps_start_time", match_time),
        Key("SeriesDescription", _SE, None, _text),
        Key("RequestAttributesSequence.ScheduledProcedureStepID", _SE, None, _text),
        Key("RequestAttributesSequence.RequestedProcedureID", _SE, None, _text),
        Key("SOPInstanceUID", _I, "i.sop_uid", match_uids),
        Key("SOPClassUID", _I, "i.sop_class_uid", match_uids),
        Key("InstanceNumber", _I, "i.instance_number", match_integer),
    )
}
_NAME_KEYS = frozenset({"PatientName", "ReferringPhysicianName"})
_DATE_TIME_PAIRS = (
    ("StudyDate", "StudyTime"),
    ("PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime"),
)
CONTROL_PARAMETERS = frozenset({"limit", "offset", "includefield", "fuzzymatching"})


@dataclass(frozen=True)
class Query:
    level: Level
    conditions: tuple[Condition, ...] = ()
    include: frozenset[str] | None = frozenset()  # extra tags (hex paths); None means all
    limit: int = 0
    offset: int = 0
    ignored: tuple[str, ...] = field(default=())  # human-readable notes for a Warning


def attribute_path(key: str) -> tuple[str, str] | None:
    """(keyword path, hex tag path) of a key given by keywords or tags, dotted for sequences;
    None when a component is neither a DICOM keyword nor a tag."""
    keywords, tags = [], []
    for part in key.split("."):
        if not part:
            return None
        tag: int | None
        if re.fullmatch(r"[0-9A-Fa-f]{8}", part):
            tag = int(part, 16)
            keyword = keyword_for_tag(tag) or part.upper()
        else:
            tag = tag_for_keyword(part)
            keyword = part
        if tag is None:
            return None
        keywords.append(keyword)
        tags.append(f"{tag:08X}")
    return ".".join(keywords), ".".join(tags)


def _vr(path: str) -> str:
    try:
        return dictionary_VR(tag_for_keyword(path.split(".")[-1]) or 0)
    except KeyError:
        return "UN"


def _condition(key: Key, value: str, fuzzy: bool, level: Level) -> Condition:
    column = key.column_at(level)
    if column is None:
        return NOTHING  # de-identification removed the attribute: only universal matching
    if key.path in _NAME_KEYS and fuzzy:
        return match_fuzzy_name(column, trim_name(value))
    if ("*" in value or "?" in value) and _vr(key.path) not in _WILDCARD_VRS:
        raise BadRequest(f"{key.path}: wildcards are not allowed for this attribute")
    return key.build(column, value, key.path)


def _include(values: Iterable[str]) -> frozenset[str] | None:
    tags = set()
    for raw in values:
        for item in raw.split(","):
            item = item.strip()
            if item == "all":
                return None
            path = attribute_path(item) if item else None
            if path is None:
                raise BadRequest(f"includefield: {item[:64]!r} is not a DICOM keyword or tag")
            tags.add(path[1])
    return frozenset(tags)


def _non_negative(name: str, raw: str | None, default: int) -> int:
    if raw is None or raw == "":
        return default
    if not re.fullmatch(r"[0-9]{1,9}", raw):
        raise BadRequest(f"{name} must be a non-negative integer")
    return int(raw)


def parse_query(
    level: Level,
    params: Iterable[tuple[str, str]],
    max_limit: int,
    scope: dict[str, str] | None = None,
) -> Query:
    """A query from (key, value) pairs: QIDO-RS parameters or a C-FIND identifier.

    `scope` holds the UIDs of the resource path (e.g. the study of /studies/{uid}/series).
    Empty values and `*` are universal matching; leading and trailing spaces are insignificant.
    Keys the archive does not match on and parameters that are not DICOM attributes are
    ignored and reported; malformed values (of keys and control parameters) raise BadRequest.
    """
    pairs = list(params)
    control = {k: v for k, v in pairs if k in CONTROL_PARAMETERS and k != "includefield"}
    fuzzy = control.get("fuzzymatching", "false").lower() == "true"
    values: dict[str, str] = {}
    ignored: list[str] = []
    for raw_key, value in pairs:
        if raw_key in CONTROL_PARAMETERS:
            continue
        path = attribute_path(raw_key)
        if path is None:  # PS3.18: a parameter the origin server does not support is ignored
            ignored.append(f"{raw_key[:64]!r} is not a query parameter of this archive")
            continue
        if len(value) > _MAX_VALUE or "\x00" in value:
            raise BadRequest(f"{path[0]}: value too long or containing NUL")
        key = KEYS.get(path[0])
        if key is None:
            ignored.append(f"{path[0]} is not a matching key of this archive")
        elif key.level > level:
            ignored.append(f"{path[0]} is not a matching key at the {level.name.lower()} level")
        elif value.strip(" ") not in ("", "*"):  # leading and trailing spaces: insignificant
            values[key.path] = value.strip(" ")
    # The resource path narrows the query: ANDed with any key of the same name, never replacing it.
    conditions = [
        _condition(KEYS[path], value, False, level) for path, value in (scope or {}).items()
    ]
    for date_key, time_key in _DATE_TIME_PAIRS:
        if date_key in values and time_key in values and "-" in values[date_key] + values[
            time_key
        ]:
            date_column, time_column = KEYS[date_key].column, KEYS[time_key].column
            assert date_column is not None and time_column is not None  # both are indexed
            conditions.append(match_date_time(
                date_column, time_column, values.pop(date_key), values.pop(time_key),
                date_key, time_key,
            ))
    conditions.extend(
        _condition(KEYS[path], value, fuzzy, level) for path, value in values.items()
    )
    limit = _non_negative("limit", control.get("limit"), max_limit)
    return Query(
        level=level,
        conditions=tuple(conditions),
        include=_include(v for k, v in pairs if k == "includefield"),
        limit=min(limit, max_limit) if limit else max_limit,
        offset=_non_negative("offset", control.get("offset"), 0),
        ignored=tuple(ignored),
    )


def where_clause(conditions: tuple[Condition, ...], first_param: int = 1) -> tuple[str, list]:
    """Number the placeholders and join the predicates with AND."""
    parts: list[str] = []
    values: list[Any] = []
    for condition in conditions:
        numbers = [f"${first_param + len(values) + i}" for i in range(len(condition.values))]
        parts.append(condition.sql.format(*numbers))
        values.extend(condition.values)
    return (" AND ".join(parts) if parts else "TRUE"), values
