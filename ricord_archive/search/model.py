"""The query model: what a QIDO-RS search or a C-FIND asks, as one typed `Query`. Pure.

A query is a level, a scope (the parent a QIDO-RS resource path names), one condition per
matching key, the keys to return and a page. The conditions are DICOM's matching types (PS3.4
C.2.2.2): universal, single value, wildcard, range (dates, times, combined date-time), UID list,
and for the archive's own needs any-of-a-list and fuzzy person names. Each adapter parses its own
input (`search.qido.parse_qido`, `dimse.find_query.parse_identifier`) by feeding its keys to
`QueryKeys`, which turns one key's DICOM value into its condition, one builder per matching type;
malformed values raise BadRequest. Nothing here knows SQL: `index/query_sql.py` translates.
Keys the archive keeps no value for (attributes de-identification removes) are not validated and
match nothing but the universal value; keys it does not match on are ignored and reported.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, IntEnum

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from ricord_archive.dicom.uids import is_uid
from ricord_archive.errors import BadRequest

_DATE = re.compile(r"[0-9]{8}")
_TIME = re.compile(r"([0-9]{2})(?:([0-9]{2})(?:([0-9]{2})(?:\.([0-9]{1,6}))?)?)?")
_INTEGER = re.compile(r"[+-]?[0-9]{1,9}")
_MAX_VALUE = 1024
# VRs on which `*` and `?` are wildcards (PS3.4 C.2.2.2.4); elsewhere they match literally.
_WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
# QIDO-RS parameters that steer a search rather than match (PS3.18 8.3.4).
CONTROL_PARAMETERS = frozenset({"limit", "offset", "cursor", "includefield", "fuzzymatching"})


class Level(IntEnum):
    PATIENT = 1
    STUDY = 2
    SERIES = 3
    INSTANCE = 4


# --- conditions: one type per matching type ---------------------------------------------------

@dataclass(frozen=True)
class Universal:
    """An empty value or `*`: every entity matches; the key is only returned."""


@dataclass(frozen=True)
class SingleValue:
    value: str | dt.date
    ignore_case: bool = False  # person names


@dataclass(frozen=True)
class Wildcard:
    pattern: str  # `*` any run of characters, `?` one; anything else literal
    ignore_case: bool = False


@dataclass(frozen=True)
class Range:
    """Dates or times from `low` to `high`, both included; None is an open end."""

    low: dt.date | dt.time | None
    high: dt.date | dt.time | None


@dataclass(frozen=True)
class DateTimeRange:
    """A date key and its time key matched as one date-time range (PS3.4 C.2.2.2.5.1)."""

    time_key: str
    low: dt.datetime | None
    high: dt.datetime | None


@dataclass(frozen=True)
class UidList:
    uids: tuple[str, ...]


@dataclass(frozen=True)
class AnyOf:
    """Any of the listed values (integer strings; the modalities a study holds)."""

    values: tuple[str | int, ...]


@dataclass(frozen=True)
class Fuzzy:
    """`fuzzymatching=true` on a person name: a case-insensitive prefix of any name component
    or word; `*` and `?` are still wildcards, so it finds whatever exact matching finds."""

    text: str


Condition = (Universal | SingleValue | Wildcard | Range | DateTimeRange | UidList | AnyOf
             | Fuzzy)


@dataclass(frozen=True)
class Term:
    """One matching key of a query (its keyword path) and its condition."""

    key: str
    condition: Condition


@dataclass(frozen=True)
class Scope:
    """The parent a search runs under (/studies/{study}/series/{series}/instances): each
    ANDed with any key of the same name, never replacing it. Empty: no parent."""

    study_uids: tuple[str, ...] = ()
    series_uids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Query:
    level: Level
    terms: tuple[Term, ...] = ()
    scope: Scope = Scope()
    returned: frozenset[str] | None = frozenset()  # extra tags (hex paths); None means all
    limit: int = 0
    offset: int = 0
    after: int | None = None  # keyset paging: only matches whose key is past this one
    fuzzy: bool = False
    site_id: int | None = None  # only this site's entities (an index site id)
    ignored: tuple[str, ...] = ()  # human-readable notes on keys not matched on


# --- the matching keys ------------------------------------------------------------------------

class Matching(Enum):
    """How a key's value is read: (name, the matching types it allows as the conformance
    statement lists them)."""

    TEXT = ("text", "single value, wildcard")
    NAME = ("name", "single value, wildcard, case-insensitive; fuzzy with `fuzzymatching=true`")
    UIDS = ("uids", "UID list")
    DATE = ("date", "single value, range")
    TIME = ("time", "single value, range")
    INTEGER = ("integer", "single value")
    ANY_OF = ("any of", "any of a list")

    @property
    def types(self) -> str:
        return self.value[1]


@dataclass(frozen=True)
class Key:
    """A matching key: its keyword path (dotted for a sequence key), level and matching;
    `stored` False when de-identification removes it (only universal matching then)."""

    path: str
    level: Level
    matching: Matching
    stored: bool = True


_P, _ST, _SE, _I = Level.PATIENT, Level.STUDY, Level.SERIES, Level.INSTANCE
_TEXT, _NAME, _UIDS = Matching.TEXT, Matching.NAME, Matching.UIDS
_DA, _TM, _IS = Matching.DATE, Matching.TIME, Matching.INTEGER
KEYS: dict[str, Key] = {
    k.path: k
    for k in (
        # PatientID, PatientName and ClinicalTrialSubjectID all hold the pseudonym.
        Key("PatientID", _P, _TEXT),
        Key("PatientName", _P, _NAME),
        Key("ClinicalTrialSubjectID", _P, _TEXT),
        Key("ClinicalTrialSiteID", _P, _TEXT),
        Key("PatientBirthDate", _P, _DA, stored=False),
        Key("IssuerOfPatientID", _P, _TEXT, stored=False),
        Key("OtherPatientIDsSequence.PatientID", _P, _TEXT, stored=False),
        Key("PatientSex", _ST, _TEXT),
        Key("PatientAge", _ST, _TEXT),
        Key("StudyInstanceUID", _ST, _UIDS),
        Key("StudyDate", _ST, _DA),
        Key("StudyTime", _ST, _TM),
        Key("AccessionNumber", _ST, _TEXT),
        Key("StudyID", _ST, _TEXT),
        Key("ModalitiesInStudy", _ST, Matching.ANY_OF),
        Key("ReferringPhysicianName", _ST, _NAME, stored=False),
        Key("StudyDescription", _ST, _TEXT, stored=False),
        Key("SeriesInstanceUID", _SE, _UIDS),
        Key("Modality", _SE, _TEXT),
        Key("SeriesNumber", _SE, _IS),
        Key("PerformedProcedureStepStartDate", _SE, _DA),
        Key("PerformedProcedureStepStartTime", _SE, _TM),
        Key("SeriesDescription", _SE, _TEXT, stored=False),
        Key("RequestAttributesSequence.ScheduledProcedureStepID", _SE, _TEXT, stored=False),
        Key("RequestAttributesSequence.RequestedProcedureID", _SE, _TEXT, stored=False),
        Key("SOPInstanceUID", _I, _UIDS),
        Key("SOPClassUID", _I, _UIDS),
        Key("InstanceNumber", _I, _IS),
    )
}
_KEY_ORDER = {path: number for number, path in enumerate(KEYS)}
_DATE_TIME_PAIRS = (
    ("StudyDate", "StudyTime"),
    ("PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime"),
)


def attribute_path(key: str) -> tuple[str, str] | None:
    """(keyword path, hex tag path) of a key given by keywords or tags, dotted for sequences;
    None when a component is neither a DICOM keyword nor a tag."""
    keywords, tags = [], []
    tag: int | None
    for part in key.split("."):
        if not part:
            return None
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


# --- one builder per matching type: a key's value (DICOM text) to its condition --------------

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


def _split_list(value: str) -> list[str]:
    return [v.strip() for v in re.split(r"[,\\]", value) if v.strip()]


def trim_name(value: str) -> str:
    """A PN value without trailing empty components or groups: `DOE^` is the name `DOE`."""
    return "=".join(group.rstrip("^") for group in value.split("=")).rstrip("=")


def _text(value: str, key: str, ignore_case: bool = False) -> Condition:
    """Single value or wildcard matching (on the VRs that allow wildcards)."""
    if "*" in value or "?" in value:
        return Wildcard(value, ignore_case)
    return SingleValue(value, ignore_case)


def _name(value: str, key: str) -> Condition:
    value = trim_name(value)
    return _text(value, key, ignore_case=True) if value else Universal()


def _uids(value: str, key: str) -> Condition:
    uids = _split_list(value)
    if not uids or not all(map(is_uid, uids)):
        raise BadRequest(f"{key}: expected one or more UIDs (digits and dots, at most 64)")
    return UidList(tuple(uids))


def _date(value: str, key: str) -> Condition:
    bounds = _split_range(value, key)
    if bounds is None:
        return SingleValue(_parse_date(value, key))
    start, end = bounds
    return Range(_parse_date(start, key) if start else None,
                 _parse_date(end, key) if end else None)


def _time(value: str, key: str) -> Condition:
    bounds = _split_range(value, key)
    if bounds is None:
        return Range(_parse_time(value, key), _parse_time(value, key, end=True))
    start, end = bounds
    return Range(_parse_time(start, key) if start else None,
                 _parse_time(end, key, end=True) if end else None)


def _integers(value: str, key: str) -> Condition:
    numbers = _split_list(value)
    if not numbers or any(not _INTEGER.fullmatch(n) for n in numbers):
        raise BadRequest(f"{key}: expected an integer")
    return AnyOf(tuple(int(n) for n in numbers))


def _any_of(value: str, key: str) -> Condition:
    return AnyOf(tuple(_split_list(value.upper())))


_BUILDERS: dict[Matching, Callable[[str, str], Condition]] = {
    Matching.TEXT: _text, Matching.NAME: _name, Matching.UIDS: _uids, Matching.DATE: _date,
    Matching.TIME: _time, Matching.INTEGER: _integers, Matching.ANY_OF: _any_of,
}


def _date_time(date_value: str, time_value: str, date_key: str, time_key: str) -> Condition:
    """StudyDate=D1-D2 with StudyTime=T1-T2: from D1 at T1 to D2 at T2."""
    dates = _split_range(date_value, date_key) or (date_value, date_value)
    times = _split_range(time_value, time_key) or (time_value, time_value)
    start = _parse_time(times[0], time_key) if times[0] else dt.time.min
    end = _parse_time(times[1], time_key, end=True) if times[1] else dt.time.max
    low = dt.datetime.combine(_parse_date(dates[0], date_key), start) if dates[0] else None
    high = dt.datetime.combine(_parse_date(dates[1], date_key), end) if dates[1] else None
    return DateTimeRange(time_key, low, high)


def _vr(path: str) -> str:
    try:
        return dictionary_VR(tag_for_keyword(path.split(".")[-1]) or 0)
    except KeyError:
        return "UN"


def condition(path: str, value: str, fuzzy: bool = False) -> Condition:
    """The condition of a non-universal value of the matching key `path`."""
    key = KEYS[path]
    if not key.stored:  # nothing to match the value against: it is not read
        return _text(value, path)
    if key.matching is Matching.NAME and fuzzy:
        return Fuzzy(trim_name(value))
    if ("*" in value or "?" in value) and _vr(path) not in _WILDCARD_VRS:
        raise BadRequest(f"{path}: wildcards are not allowed for this attribute")
    return _BUILDERS[key.matching](value, path)


def scope_uids(path: str, value: str) -> tuple[str, ...]:
    """The UIDs a resource path names for the UID key `path` (a list, like the key's value)."""
    found = condition(path, value)
    assert isinstance(found, UidList)
    return found.uids


class QueryKeys:
    """The matching keys of one query, fed in the order the request gives them as (keyword
    path, DICOM value). Leading and trailing spaces are insignificant; an empty value or `*`
    is universal; a later value of a key replaces an earlier one, a universal never does."""

    def __init__(self, level: Level, fuzzy: bool = False) -> None:
        self.level = level
        self.fuzzy = fuzzy
        self.ignored: list[str] = []
        self._values: dict[str, str] = {}  # non-universal values
        self._named: dict[str, None] = {}  # every key named, in order

    def ignore(self, note: str) -> None:
        self.ignored.append(note)

    def add(self, path: str, value: str) -> None:
        if len(value) > _MAX_VALUE or "\x00" in value:
            raise BadRequest(f"{path}: value too long or containing NUL")
        key = KEYS.get(path)
        if key is None:
            self.ignore(f"{path} is not a matching key of this archive")
        elif key.level > self.level:
            self.ignore(f"{path} is not a matching key at the {self.level.name.lower()} level")
        else:
            self._named.setdefault(path)
            value = value.strip(" ")
            if value not in ("", "*"):
                self._values[path] = value

    def terms(self) -> tuple[Term, ...]:
        """One term per key named, in the order of KEYS whatever the request's order (a
        combined date-time range on its date key); malformed values raise BadRequest."""
        values = dict(self._values)
        terms = []
        for date_key, time_key in _DATE_TIME_PAIRS:
            if date_key in values and time_key in values and "-" in (
                    values[date_key] + values[time_key]):
                terms.append(Term(date_key, _date_time(
                    values.pop(date_key), values.pop(time_key), date_key, time_key)))
        terms.extend(Term(path, condition(path, value, self.fuzzy))
                     for path, value in values.items())
        terms.extend(Term(path, Universal()) for path in self._named if path not in self._values)
        return tuple(sorted(terms, key=lambda term: _KEY_ORDER[term.key]))
