"""Reads from the index: query answers and the locations and metadata of stored instances."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from ricord_archive.matching import StudyQuery, where_clause


@dataclass(frozen=True)
class StudyRow:
    study_json: bytes
    modalities: list[str]
    num_series: int
    num_instances: int


async def find_studies(pool: asyncpg.Pool, query: StudyQuery) -> tuple[list[StudyRow], bool]:
    """Matching studies in a stable order; the flag says whether more exist past the limit."""
    where, values = where_clause(query.conditions)
    limit_param = len(values) + 1
    sql = (
        "SELECT s.dicom_json, s.modalities, s.num_series, s.num_instances "
        "FROM study s JOIN site ON site.id = s.site_id "
        f"WHERE {where} ORDER BY s.pk LIMIT ${limit_param} OFFSET ${limit_param + 1}"
    )
    limit = query.limit if query.limit is not None else 2**31 - 2
    rows = await pool.fetch(sql, *values, limit + 1, query.offset)
    more = len(rows) > limit
    return [
        StudyRow(r["dicom_json"], list(r["modalities"]), r["num_series"], r["num_instances"])
        for r in rows[:limit]
    ], more


@dataclass(frozen=True)
class StoredInstance:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    blob_key: str
    size_bytes: int


_SCOPE = {
    "study": "st.study_uid = $1",
    "series": "st.study_uid = $1 AND se.series_uid = $2",
    "instance": "st.study_uid = $1 AND se.series_uid = $2 AND i.sop_uid = $3",
}
_FROM = (
    "FROM instance i JOIN series se ON se.pk = i.series_pk JOIN study st ON st.pk = i.study_pk"
)
_ORDER = "ORDER BY se.series_number NULLS LAST, se.pk, i.instance_number NULLS LAST, i.pk"


async def stored_instances(pool: asyncpg.Pool, *uids: str) -> list[StoredInstance]:
    """The instances of a study, a series or one instance (by how many UIDs are given)."""
    scope = _SCOPE[("study", "series", "instance")[len(uids) - 1]]
    rows = await pool.fetch(
        "SELECT st.study_uid, se.series_uid, i.sop_uid, i.sop_class_uid, "
        f"i.transfer_syntax_uid, i.blob_key, i.size_bytes {_FROM} WHERE {scope} {_ORDER}",
        *uids,
    )
    return [StoredInstance(**dict(r)) for r in rows]


async def instance_metadata(pool: asyncpg.Pool, *uids: str) -> list[bytes]:
    """The stored DICOM JSON of each instance in scope, in retrieval order."""
    scope = _SCOPE[("study", "series", "instance")[len(uids) - 1]]
    rows = await pool.fetch(f"SELECT i.dicom_json {_FROM} WHERE {scope} {_ORDER}", *uids)
    return [r["dicom_json"] for r in rows]
