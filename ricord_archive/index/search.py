"""Running a `Query` against the index: one round trip per page, in a stable order.

An instance search first resolves its studies (`query_sql.studies_sql`), then reads its page
with those studies' keys as a bind parameter, so PostgreSQL reads only their partitions of the
instance table; a search that names no studies, or more than STUDY_CAP, is refused."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from ricord_archive.errors import QueryTooBroad
from ricord_archive.index.database import translating
from ricord_archive.index.query_sql import (
    COUNT_CAP,
    STUDY_CAP,
    page_sql,
    rest_count_sql,
    studies_sql,
)
from ricord_archive.search.model import Level, Query

__all__ = ["COUNT_CAP", "STUDY_CAP", "Found", "Page", "search"]

_NARROW = ("by StudyInstanceUID (or /studies/{uid}/instances), SeriesInstanceUID, "
           "SOPInstanceUID, PatientID or another patient or study attribute")


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
    last_key: int | None = None  # the key of the page's last match when more exist (keyset)


async def _studies(conn: asyncpg.Connection, query: Query) -> list[int]:
    """The keys of the studies an instance search reads; QueryTooBroad when they are not
    named or too many."""
    resolving = studies_sql(query)
    if resolving is None:
        raise QueryTooBroad(f"instance search too broad: name its studies {_NARROW}")
    sql, arguments = resolving
    found = [row["pk"] for row in await conn.fetch(sql, *arguments)]
    if len(found) > STUDY_CAP:
        raise QueryTooBroad(f"instance search too broad: it matches more than {STUDY_CAP} "
                            f"studies; name fewer {_NARROW}")
    return found


@translating
async def search(pool: asyncpg.Pool, query: Query) -> Page:
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        # A plan per search's values: a generic plan of a prepared statement guesses one
        # selectivity for every modality or site and walks the study table for a rare one.
        await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
        study_pks = await _studies(conn, query) if query.level is Level.INSTANCE else None
        sql, arguments = page_sql(query, study_pks)
        rows = await conn.fetch(sql, *arguments)
        if len(rows) <= query.limit:
            return Page([_found(row) for row in rows], 0)
        rows = rows[: query.limit]
        last_key = rows[-1]["page_key"]
        count_sql, count_arguments = rest_count_sql(query, last_key, study_pks)
        more = await conn.fetchval(count_sql, *count_arguments)
    return Page([_found(row) for row in rows], more, last_key)
