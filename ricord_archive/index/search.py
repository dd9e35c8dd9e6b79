"""Running a `Query` against the index: one round trip per page, in a stable order."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from ricord_archive.index.database import translating
from ricord_archive.index.query_sql import COUNT_CAP, page_sql, rest_count_sql
from ricord_archive.search.model import Query

__all__ = ["COUNT_CAP", "Found", "Page", "search"]


@dataclass(frozen=True, slots=True)
class Found:
    """One match: the stored DICOM JSON of its study, series and instance (as far as its level
    has them; a patient's is its latest study's) and its related-object counts."""

    study_json: str | None
    series_json: str | None = None
    instance_json: str | None = None
    modalities: tuple[str, ...] = ()
    num_studies: int = 0
    num_series: int = 0
    num_instances: int = 0


def _found(row: asyncpg.Record) -> Found:
    return Found(
        row["study_json"], row.get("series_json"), row.get("instance_json"),
        tuple(row.get("modalities") or ()), row.get("num_studies", 0), row.get("num_series", 0),
        row.get("num_instances", 0),
    )


@dataclass(frozen=True)
class Page:
    rows: list[Found]
    more: int  # how many further matches exist past this page (COUNT_CAP: at least that many)


@translating
async def search(pool: asyncpg.Pool, query: Query) -> Page:
    sql, arguments = page_sql(query)
    async with pool.acquire() as conn:
        rows = await conn.fetch(sql, *arguments)
        more = 0
        if len(rows) > query.limit:
            rows = rows[: query.limit]
            count_sql, count_arguments = rest_count_sql(query)
            more = await conn.fetchval(count_sql, *count_arguments)
    return Page([_found(row) for row in rows], more)
