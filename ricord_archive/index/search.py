"""Running a `Query` against the index: one round trip per page, in a stable order."""

from __future__ import annotations

import re
from dataclasses import dataclass

import asyncpg

from ricord_archive.matching import Level, Query, where_clause

_BASE = {
    Level.PATIENT: "patient p", Level.STUDY: "study st", Level.SERIES: "series se",
    Level.INSTANCE: "instance i",
}
# Joins a level may need, as (alias, clause, alias it joins from), from the base upwards.
_UP = ("p", "JOIN patient p ON p.pk = st.patient_pk", "st"), (
    "site", "JOIN site ON site.id = p.site_id", "p")
_JOINS = {
    Level.PATIENT: (("site", "JOIN site ON site.id = p.site_id", "p"),),
    Level.STUDY: _UP,
    Level.SERIES: (("st", "JOIN study st ON st.pk = se.study_pk", "se"), *_UP),
    Level.INSTANCE: (("se", "JOIN series se ON se.pk = i.series_pk", "i"),
                     ("st", "JOIN study st ON st.pk = i.study_pk", "i"), *_UP),
}
_ALIAS = re.compile(r"\b(i|se|st|p|site)\.")


def _from(level: Level, *sql: str) -> str:
    """FROM the level's table with only the joins the given SQL fragments refer to."""
    needed = set(_ALIAS.findall(" ".join(sql)))
    for alias, _, parent in reversed(_JOINS[level]):
        if alias in needed:
            needed.add(parent)
    joins = [clause for alias, clause, _ in _JOINS[level] if alias in needed]
    return " ".join(["FROM", _BASE[level], *joins])


_COLUMNS = {
    Level.PATIENT: "(SELECT s.dicom_json FROM study s WHERE s.patient_pk = p.pk "
                   "ORDER BY s.pk DESC LIMIT 1) AS study_json",
    Level.STUDY: "st.dicom_json AS study_json, st.modalities",
    Level.SERIES: "st.dicom_json AS study_json, se.dicom_json AS series_json, st.study_uid",
    Level.INSTANCE: "st.dicom_json AS study_json, se.dicom_json AS series_json, "
                    "i.dicom_json AS instance_json, st.study_uid, se.series_uid",
}
_ORDER = {
    Level.PATIENT: "p.pk", Level.STUDY: "st.pk", Level.SERIES: "se.pk", Level.INSTANCE: "i.pk",
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


@dataclass(frozen=True)
class Page:
    rows: list[asyncpg.Record]
    more: int  # how many further matches exist past this page (COUNT_CAP: at least that many)


def page_sql(query: Query) -> tuple[str, list]:
    """The SQL of one page (one row more than the limit, to see whether more exist)."""
    where, values = where_clause(query.conditions)
    level, n = query.level, len(values)
    order, columns = _ORDER[level], _COLUMNS[level]
    sql = (
        f"SELECT {order} AS page_key, {columns} {_from(level, columns, where)} WHERE {where} "
        f"ORDER BY {order} LIMIT ${n + 1} OFFSET ${n + 2}"
    )
    if level in _COUNTS:
        key, counts = _COUNTS[level]
        sql = (
            f"SELECT page.*, counts.* FROM ({sql}) AS page, LATERAL (SELECT {counts}"
            f"coalesce(sum(t.instances), 0) AS num_instances FROM instance_tally t "
            f"WHERE t.{key} = page.page_key) AS counts ORDER BY page.page_key"
        )
    return sql, [*values, query.limit + 1, query.offset]


def rest_count_sql(query: Query) -> tuple[str, list]:
    """The SQL counting the matches past the page, up to COUNT_CAP."""
    where, values = where_clause(query.conditions)
    level, n = query.level, len(values)
    sql = (
        f"SELECT count(*) FROM (SELECT 1 {_from(level, where)} WHERE {where} "
        f"ORDER BY {_ORDER[level]} LIMIT ${n + 1} OFFSET ${n + 2}) AS rest"
    )
    return sql, [*values, COUNT_CAP, query.offset + query.limit]


async def search(pool: asyncpg.Pool, query: Query) -> Page:
    sql, arguments = page_sql(query)
    async with pool.acquire() as conn:
        rows = await conn.fetch(sql, *arguments)
        more = 0
        if len(rows) > query.limit:
            rows = rows[: query.limit]
            count_sql, count_arguments = rest_count_sql(query)
            more = await conn.fetchval(count_sql, *count_arguments)
    return Page(rows, more)


def matches_sql(query: Query, columns: str) -> tuple[str, list]:
    """SELECT `columns` of every match of the query, unpaged, in the stable order (cohorts
    freeze what a query matches with it)."""
    where, values = where_clause(query.conditions)
    level = query.level
    return (f"SELECT {columns} {_from(level, columns, where)} WHERE {where} "
            f"ORDER BY {_ORDER[level]}", values)
