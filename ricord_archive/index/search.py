"""Running a `Query` against the index: one round trip per page, in a stable order."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from ricord_archive.matching import Level, Query, where_clause

_FROM = {
    Level.PATIENT: "FROM patient p JOIN site ON site.id = p.site_id",
    Level.STUDY: "FROM study st JOIN patient p ON p.pk = st.patient_pk "
                 "JOIN site ON site.id = p.site_id",
    Level.SERIES: "FROM series se JOIN study st ON st.pk = se.study_pk "
                  "JOIN patient p ON p.pk = st.patient_pk JOIN site ON site.id = p.site_id",
    Level.INSTANCE: "FROM instance i JOIN series se ON se.pk = i.series_pk "
                    "JOIN study st ON st.pk = i.study_pk "
                    "JOIN patient p ON p.pk = st.patient_pk JOIN site ON site.id = p.site_id",
}
_COLUMNS = {
    Level.PATIENT: "p.pseudonym, site.siteid, p.num_studies, p.num_series, p.num_instances, "
                   "(SELECT st.dicom_json FROM study st WHERE st.patient_pk = p.pk "
                   "ORDER BY st.pk DESC LIMIT 1) AS study_json",
    Level.STUDY: "st.dicom_json AS study_json, st.modalities, st.num_series, st.num_instances",
    Level.SERIES: "st.dicom_json AS study_json, se.dicom_json AS series_json, st.study_uid, "
                  "se.num_instances",
    Level.INSTANCE: "st.dicom_json AS study_json, se.dicom_json AS series_json, "
                    "i.dicom_json AS instance_json, st.study_uid, se.series_uid",
}
_ORDER = {
    Level.PATIENT: "p.pk", Level.STUDY: "st.pk", Level.SERIES: "se.pk", Level.INSTANCE: "i.pk",
}
COUNT_CAP = 100_000


@dataclass(frozen=True)
class Page:
    rows: list[asyncpg.Record]
    more: int  # how many further matches exist past this page (at most COUNT_CAP)


def page_sql(query: Query) -> tuple[str, list]:
    """The SQL of one page (one row more than the limit, to see whether more exist)."""
    where, values = where_clause(query.conditions)
    level = query.level
    n = len(values)
    sql = (
        f"SELECT {_COLUMNS[level]} {_FROM[level]} WHERE {where} "
        f"ORDER BY {_ORDER[level]} LIMIT ${n + 1} OFFSET ${n + 2}"
    )
    return sql, [*values, query.limit + 1, query.offset]


async def search(pool: asyncpg.Pool, query: Query) -> Page:
    sql, arguments = page_sql(query)
    where, values = where_clause(query.conditions)
    level = query.level
    n = len(values)
    async with pool.acquire() as conn:
        rows = await conn.fetch(sql, *arguments)
        more = 0
        if len(rows) > query.limit:
            rows = rows[: query.limit]
            more = await conn.fetchval(
                f"SELECT count(*) FROM (SELECT 1 {_FROM[level]} WHERE {where} "
                f"ORDER BY {_ORDER[level]} LIMIT ${n + 1} OFFSET ${n + 2}) AS rest",
                *values, COUNT_CAP, query.offset + query.limit,
            )
    return Page(rows, more)
