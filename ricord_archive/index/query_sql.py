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
    KEYS,
    AnyOf,
    Condition,
    DateTimeRange,
    Fuzzy,
    Level,
    Query,
    Range,
    Scope,
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
    "ModalitiesInStudy": Column("st", "st.modalities"),  # matched on study_modality
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
_MODALITIES_KEY = "ModalitiesInStudy"
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
    """The WHERE clause of a query: its predicates, bind values ($1 upwards) and tables.

    `after`: only the matches whose key (the level's pk) is past it (keyset paging).
    `study_pks`: only the matches in these studies (an instance search's resolved studies, a
    bind parameter so that PostgreSQL prunes the instance partitions at plan time)."""

    def __init__(self, query: Query, after: int | None = None,
                 study_pks: list[int] | None = None, wanted: int | None = None) -> None:
        self.level = query.level
        self.values: list[Any] = []
        self.tables: set[str] = set()
        self._after_value = after
        self._after_sql: str | None = None
        scope = query.scope
        terms = [
            *(Term(k, UidList(u)) for k, u in (("StudyInstanceUID", scope.study_uids),
                                               ("SeriesInstanceUID", scope.series_uids)) if u),
            *query.terms,
        ]
        narrowing = [t for t in terms if not isinstance(t.condition, Universal)]
        # A study search on ModalitiesInStudy alone: its keys (past `after`) are the whole
        # answer, so a statement wanting only the first `wanted` of them reads at most that
        # many of each modality, and a count reads study_modality only (its foreign key on
        # study holds).
        sole = (self.level is Level.STUDY and query.site_id is None and study_pks is None
                and len(narrowing) == 1 and narrowing[0].key == _MODALITIES_KEY
                and isinstance(narrowing[0].condition, AnyOf))
        self._wanted = wanted if sole else None
        self.sole_ranges: list[str] | None = None
        parts = [self._term(t) for t in narrowing]
        if query.site_id is not None:
            parts.append(f"{self._column(_SITE_KEY).sql} = {self.bind(query.site_id)}")
        if study_pks is not None:
            parts.append(f"i.study_pk = ANY({self.bind(study_pks)}::bigint[])")
        if after is not None:
            parts.append(f"{_key(self.level)} > {self._after()}")
        self.sql = " AND ".join(parts) if parts else "TRUE"

    def bind(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"

    def _after(self) -> str:
        """The keyset bound's parameter, bound once however often it is read."""
        if self._after_sql is None:
            self._after_sql = self.bind(self._after_value)
        return self._after_sql

    def _column(self, key: str) -> Column:
        found = column(key, self.level)
        assert found is not None
        self.tables.add(found.table)
        return found

    def _term(self, term: Term) -> str:
        """The predicate of a term that narrows (universal matching needs none)."""
        condition = term.condition
        if column(term.key, self.level) is None:
            return "FALSE"  # de-identification removed it: only universal matching
        target = self._column(term.key)
        if term.key == _SITE_KEY:
            return self._site(target, condition)
        if term.key == _MODALITIES_KEY and isinstance(condition, AnyOf):
            return self._modalities(condition)
        if isinstance(condition, DateTimeRange):
            time = self._column(condition.time_key)
            combined = Column(target.table, f"({target.sql} + coalesce({time.sql}, '00:00'))")
            return self._range(combined, condition.low, condition.high)
        return self._predicate(target, condition)

    def _site(self, target: Column, condition: Condition) -> str:
        """One site's entities as `= (SELECT ...)`, so that the (site_id, pk) index yields them
        in key order; a wildcard may name several sites."""
        site = self._predicate(_SITE_ID, condition)
        if isinstance(condition, SingleValue):
            return f"{target.sql} = (SELECT id FROM site WHERE {site})"
        return f"{target.sql} IN (SELECT id FROM site WHERE {site})"

    def _modalities(self, condition: AnyOf) -> str:
        """The studies holding any of the modalities, from study_modality (migrations/015).
        One modality: its range of the primary key (modality, study_pk) is unique in study_pk,
        so PostgreSQL joins it as the driving side in study order and a page reads what it
        returns. A list alone in a statement wanting its first `wanted` keys: one such range
        per modality, each stopping there (the first `wanted` keys of the union are among the
        first `wanted` of each modality), de-duplicated by the semi-join, so neither a page
        nor a count hashes every row of a common modality. A list with other terms: a
        semi-join whose plan follows their selectivity (a site's studies walked in order, each
        probed)."""
        bound = f" AND sm.study_pk > {self._after()}" if (
            self._after_value is not None and self.level is Level.STUDY) else ""
        values = list(dict.fromkeys(condition.values))
        if len(values) > 1 and self._wanted is None:
            return (f"EXISTS (SELECT 1 FROM study_modality sm WHERE sm.study_pk = st.pk "
                    f"AND sm.modality = ANY({self.bind(values)}){bound})")
        first = f" ORDER BY sm.study_pk LIMIT {self.bind(self._wanted)}" if (
            len(values) > 1) else ""
        ranges = [f"SELECT sm.study_pk FROM study_modality sm "
                  f"WHERE sm.modality = {self.bind(value)}{bound}{first}" for value in values]
        if self._wanted is not None:
            self.sole_ranges = ranges
        return f"st.pk IN ({_union(ranges)})"

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
            return f"{target.sql} = ANY({self.bind(list(condition.values))})"
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


def _union(selects: list[str]) -> str:
    """UNION ALL of the statements (parenthesised, each may have its ORDER BY and LIMIT)."""
    return selects[0] if len(selects) == 1 else " UNION ALL ".join(f"({s})" for s in selects)


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


def page_sql(query: Query, study_pks: list[int] | None = None) -> tuple[str, list]:
    """The SQL of one page (one row more than the limit, to see whether more exist): the
    matches past `query.after` (keyset), skipping `query.offset` of them."""
    where = Where(query, query.after, study_pks, query.offset + query.limit + 1)
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


def rest_count_sql(query: Query, last_key: int,
                   study_pks: list[int] | None = None) -> tuple[str, list]:
    """The SQL counting the matches past the page's last key, up to COUNT_CAP: a keyset range
    read in key order, so the count reads at most COUNT_CAP entries of the index that drives
    the page, whatever the page's offset. A study search on ModalitiesInStudy alone counts
    study_modality's keys without reading the study table."""
    where = Where(query, last_key, study_pks, COUNT_CAP)
    level, cap, ranges = query.level, f"${len(where.values) + 1}", where.sole_ranges
    if ranges is None:
        sql = (f"SELECT count(*) FROM (SELECT 1 {from_clause(level, where.tables)} "
               f"WHERE {where.sql} ORDER BY {_key(level)} LIMIT {cap}) AS rest")
    elif len(ranges) == 1:
        sql = f"SELECT count(*) FROM ({ranges[0]} LIMIT {cap}) AS rest"
    else:  # each range stops at the cap: more than the cap in all when one reaches it
        sql = (f"SELECT least(count(DISTINCT m.study_pk), {cap}) "
               f"FROM ({_union(ranges)}) AS m")
    return sql, [*where.values, COUNT_CAP]


STUDY_CAP = 100


def studies_sql(query: Query) -> tuple[str, list] | None:
    """The SQL resolving an instance search's studies, at most STUDY_CAP + 1 of them, from its
    study and patient terms, its study and series scope and its SeriesInstanceUID and
    SOPInstanceUID lists (through series and the instance_uid lookup, never the partitioned
    instance table); None when nothing narrows it to some studies."""
    above = tuple(term for term in query.terms if KEYS[term.key].level <= Level.STUDY)
    study_query = Query(Level.STUDY, above, Scope(query.scope.study_uids),
                        site_id=query.site_id)
    where = Where(study_query)
    parts = [where.sql] if where.sql != "TRUE" else []
    narrowed = bool(query.scope.study_uids) or any(
        not isinstance(term.condition, Universal) for term in above)
    series = [*query.scope.series_uids, *_uids(query, "SeriesInstanceUID")]
    if series:
        parts.append("st.pk IN (SELECT se.study_pk FROM series se "
                     f"WHERE se.series_uid = ANY({where.bind(series)}))")
    instances = _uids(query, "SOPInstanceUID")
    if instances:
        parts.append("st.pk IN (SELECT u.study_pk FROM instance_uid u "
                      f"WHERE u.sop_uid = ANY({where.bind(instances)}))")
    if not (narrowed or series or instances):
        return None
    sql = (f"SELECT st.pk {from_clause(Level.STUDY, where.tables)} "
           f"WHERE {' AND '.join(parts)} ORDER BY st.pk LIMIT {STUDY_CAP + 1}")
    return sql, where.values


def _uids(query: Query, key: str) -> list[str]:
    """The UIDs of the query's UID-list condition on `key`, none when it has none."""
    return [uid for term in query.terms if term.key == key
            and isinstance(term.condition, UidList) for uid in term.condition.uids]


def matches_sql(query: Query) -> tuple[str, list]:
    """SELECT the key (`pk`) of every match of the query, unpaged, in the stable order
    (cohorts freeze what a query matches with it)."""
    where = Where(query)
    level = query.level
    return (f"SELECT {_key(level)} AS pk {from_clause(level, where.tables)} WHERE {where.sql} "
            f"ORDER BY {_key(level)}", where.values)
