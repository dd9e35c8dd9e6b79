"""A `Query` as SQL: the one place the query model meets the index's tables. Pure.

Each matching key names the column holding its value; each condition type has one builder.
User input only ever travels as a bind parameter, never as SQL text. The joins a statement needs
follow from the tables of the columns it reads, each joined through its parent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ricord_archive.search.model import (
    AnyOf,
    Condition,
    DateTimeRange,
    Fuzzy,
    Level,
    Query,
    Range,
    SingleValue,
    Term,
    UidList,
    Universal,
    Wildcard,
)


@dataclass(frozen=True)
class Column:
    table: str  # the alias of the table holding it: p, st, se, i
    sql: str
    array: bool = False


_PSEUDONYM = Column("p", "p.pseudonym")
_COLUMNS = {
    "PatientID": _PSEUDONYM, "PatientName": _PSEUDONYM, "ClinicalTrialSubjectID": _PSEUDONYM,
    "ClinicalTrialSiteID": Column("p", "p.site_id"),
    "PatientSex": Column("st", "st.patient_sex"),
    "PatientAge": Column("st", "st.patient_age"),
    "StudyInstanceUID": Column("st", "st.study_uid"),
    "StudyDate": Column("st", "st.study_date"),
    "StudyTime": Column("st", "st.study_time"),
    "AccessionNumber": Column("st", "st.accession_number"),
    "StudyID": Column("st", "st.study_id"),
    "ModalitiesInStudy": Column("st", "st.modalities", array=True),
    "SeriesInstanceUID": Column("se", "se.series_uid"),
    "Modality": Column("se", "se.modality"),
    "SeriesNumber": Column("se", "se.series_number"),
    "PerformedProcedureStepStartDate": Column("se", "se.pps_start_date"),
    "PerformedProcedureStepStartTime": Column("se", "se.pps_start_time"),
    "SOPInstanceUID": Column("i", "i.sop_uid"),
    "SOPClassUID": Column("i", "i.sop_class_uid"),
    "InstanceNumber": Column("i", "i.instance_number"),
}
# The same value denormalised on study, read at the study level and below.
_STUDY_COLUMNS = {"ClinicalTrialSiteID": Column("st", "st.site_id")}
# ClinicalTrialSiteID holds the site's SITEID, matched on the site table.
_SITE_ID = Column("site", "siteid")
_SITE_KEY = "ClinicalTrialSiteID"
_WORD_START = "(^|[\\^ =-])"  # a fuzzy name's text starts a component or a word

_BASE = {
    Level.PATIENT: ("p", "patient p"), Level.STUDY: ("st", "study st"),
    Level.SERIES: ("se", "series se"), Level.INSTANCE: ("i", "instance i"),
}
# The joins of a level, as (table, clause, the table it joins from), from the base upwards.
_TO_PATIENT = ("p", "JOIN patient p ON p.pk = st.patient_pk", "st")
_JOINS = {
    Level.PATIENT: (),
    Level.STUDY: (_TO_PATIENT,),
    Level.SERIES: (("st", "JOIN study st ON st.pk = se.study_pk", "se"), _TO_PATIENT),
    Level.INSTANCE: (("se", "JOIN series se ON se.pk = i.series_pk", "i"),
                     ("st", "JOIN study st ON st.pk = i.study_pk", "i"), _TO_PATIENT),
}


def column(key: str, level: Level) -> Column | None:
    """The column a matching key reads at `level`; None when the index keeps no value."""
    if level >= Level.STUDY and key in _STUDY_COLUMNS:
        return _STUDY_COLUMNS[key]
    return _COLUMNS.get(key)


class Where:
    """The WHERE clause of a query: its predicates, bind values ($1 upwards) and tables."""

    def __init__(self, query: Query) -> None:
        self.level = query.level
        self.values: list[Any] = []
        self.tables: set[str] = set()
        scope = query.scope
        terms = [
            *(Term(k, UidList(u)) for k, u in (("StudyInstanceUID", scope.study_uids),
                                               ("SeriesInstanceUID", scope.series_uids)) if u),
            *query.terms,
        ]
        parts = [p for p in (self._term(t) for t in terms) if p is not None]
        if query.site_id is not None:
            parts.append(f"{self._column(_SITE_KEY).sql} = {self.bind(query.site_id)}")
        self.sql = " AND ".join(parts) if parts else "TRUE"

    def bind(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"

    def _column(self, key: str) -> Column:
        found = column(key, self.level)
        assert found is not None
        self.tables.add(found.table)
        return found

    def _term(self, term: Term) -> str | None:
        condition = term.condition
        if isinstance(condition, Universal):
            return None
        if column(term.key, self.level) is None:
            return "FALSE"  # de-identification removed it: only universal matching
        target = self._column(term.key)
        if term.key == _SITE_KEY:
            site = self._predicate(_SITE_ID, condition)
            return f"{target.sql} IN (SELECT id FROM site WHERE {site})"
        if isinstance(condition, DateTimeRange):
            time = self._column(condition.time_key)
            combined = Column(target.table, f"({target.sql} + coalesce({time.sql}, '00:00'))")
            return self._range(combined, condition.low, condition.high)
        return self._predicate(target, condition)

    def _predicate(self, target: Column, condition: Condition) -> str:
        if isinstance(condition, SingleValue):
            return self._single(target, condition)
        if isinstance(condition, Wildcard):
            return self._wildcard(target, condition)
        if isinstance(condition, Range):
            return self._range(target, condition.low, condition.high)
        if isinstance(condition, UidList):
            return f"{target.sql} = ANY({self.bind(list(condition.uids))})"
        if isinstance(condition, AnyOf):
            operator = "&& {}" if target.array else "= ANY({})"
            return f"{target.sql} {operator.format(self.bind(list(condition.values)))}"
        if isinstance(condition, Fuzzy):
            return self._fuzzy(target, condition)
        raise TypeError(f"no SQL for {type(condition).__name__} on {target.sql}")

    def _single(self, target: Column, condition: SingleValue) -> str:
        value = condition.value
        if condition.ignore_case and isinstance(value, str):
            return f"upper({target.sql}) = {self.bind(value.upper())}"
        return f"{target.sql} = {self.bind(value)}"

    def _wildcard(self, target: Column, condition: Wildcard) -> str:
        """`*`/`?` to a LIKE pattern; the user's `%`, `_` and `\\` match literally."""
        probe = condition.pattern.upper() if condition.ignore_case else condition.pattern
        escaped = probe.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = escaped.replace("*", "%").replace("?", "_")
        sql = f"upper({target.sql})" if condition.ignore_case else target.sql
        return f"{sql} LIKE {self.bind(pattern)}"

    def _range(self, target: Column, low: Any, high: Any) -> str:
        if low is not None and high is not None:
            return f"{target.sql} BETWEEN {self.bind(low)} AND {self.bind(high)}"
        if low is not None:
            return f"{target.sql} >= {self.bind(low)}"
        return f"{target.sql} <= {self.bind(high)}"

    def _fuzzy(self, target: Column, condition: Fuzzy) -> str:
        """Any name component or word (after `^`, space, `=` or `-`) starting with the text."""
        pattern = "".join(
            ".*" if char == "*" else "." if char == "?" else re.escape(char)
            for char in condition.text.upper()
        )
        return f"upper({target.sql}) ~ {self.bind(_WORD_START + pattern)}"


def from_clause(level: Level, tables: set[str]) -> str:
    """FROM the level's table with the joins that reach `tables`, each through its parent."""
    needed = set(tables)
    for table, _, parent in reversed(_JOINS[level]):
        if table in needed:
            needed.add(parent)
    joins = [clause for table, clause, _ in _JOINS[level] if table in needed]
    return " ".join(["FROM", _BASE[level][1], *joins])


# What a page selects per level (DICOM JSON of each entity above) and the tables it reads.
_COLUMNS_OF = {
    Level.PATIENT: ("(SELECT s.dicom_json FROM study s WHERE s.patient_pk = p.pk "
                    "ORDER BY s.pk DESC LIMIT 1) AS study_json", set()),
    Level.STUDY: ("st.dicom_json AS study_json, st.modalities", {"st"}),
    Level.SERIES: ("st.dicom_json AS study_json, se.dicom_json AS series_json", {"st", "se"}),
    Level.INSTANCE: ("st.dicom_json AS study_json, se.dicom_json AS series_json, "
                     "i.dicom_json AS instance_json", {"st", "se", "i"}),
}
# The related-object counts of a level (NumberOfStudyRelatedInstances and the like), summed from
# the instance tally (migrations/009) for the rows of the page only: (tally column, counts).
_COUNTS = {
    Level.PATIENT: ("patient_pk", "count(DISTINCT t.study_pk) AS num_studies, "
                                  "count(DISTINCT t.series_pk) AS num_series, "),
    Level.STUDY: ("study_pk", "count(DISTINCT t.series_pk) AS num_series, "),
    Level.SERIES: ("series_pk", ""),
}
COUNT_CAP = 10_000


def _key(level: Level) -> str:
    return f"{_BASE[level][0]}.pk"


def page_sql(query: Query) -> tuple[str, list]:
    """The SQL of one page (one row more than the limit, to see whether more exist)."""
    where = Where(query)
    level, n = query.level, len(where.values)
    columns, tables = _COLUMNS_OF[level]
    sql = (
        f"SELECT {_key(level)} AS page_key, {columns} "
        f"{from_clause(level, tables | where.tables)} WHERE {where.sql} "
        f"ORDER BY {_key(level)} LIMIT ${n + 1} OFFSET ${n + 2}"
    )
    if level in _COUNTS:
        tally, counts = _COUNTS[level]
        sql = (
            f"SELECT page.*, counts.* FROM ({sql}) AS page, LATERAL (SELECT {counts}"
            f"coalesce(sum(t.instances), 0) AS num_instances FROM instance_tally t "
            f"WHERE t.{tally} = page.page_key) AS counts ORDER BY page.page_key"
        )
    return sql, [*where.values, query.limit + 1, query.offset]


def rest_count_sql(query: Query) -> tuple[str, list]:
    """The SQL counting the matches past the page, up to COUNT_CAP."""
    where = Where(query)
    level, n = query.level, len(where.values)
    sql = (
        f"SELECT count(*) FROM (SELECT 1 {from_clause(level, where.tables)} WHERE {where.sql} "
        f"ORDER BY {_key(level)} LIMIT ${n + 1} OFFSET ${n + 2}) AS rest"
    )
    return sql, [*where.values, COUNT_CAP, query.offset + query.limit]


def matches_sql(query: Query) -> tuple[str, list]:
    """SELECT the key (`pk`) of every match of the query, unpaged, in the stable order
    (cohorts freeze what a query matches with it)."""
    where = Where(query)
    level = query.level
    return (f"SELECT {_key(level)} AS pk {from_clause(level, where.tables)} WHERE {where.sql} "
            f"ORDER BY {_key(level)}", where.values)
