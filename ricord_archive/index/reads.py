"""Reads from the index: query answers, the locations and metadata of stored instances, and
the site and patient rows the offline tools look up (never allocating anything)."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from ricord_archive.index.store import Patient, Site


@dataclass(frozen=True)
class StoredInstance:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    blob_key: str
    size_bytes: int
    pixel_data_offset: int | None
    pixel_data_length: int | None
    number_of_frames: int
    rows: int | None
    columns: int | None
    samples_per_pixel: int | None
    bits_allocated: int | None


_SCOPE = {
    "study": "st.study_uid = $1",
    "series": "st.study_uid = $1 AND se.series_uid = $2",
    "instance": "st.study_uid = $1 AND se.series_uid = $2 AND i.sop_uid = $3",
}
_FROM = (
    "FROM instance i JOIN series se ON se.pk = i.series_pk JOIN study st ON st.pk = i.study_pk"
)
_ORDER = "ORDER BY se.series_number NULLS LAST, se.pk, i.instance_number NULLS LAST, i.pk"


def _where(uids: tuple[str, ...], site_id: int | None) -> tuple[str, list]:
    """The WHERE clause of a study, series or instance (by how many UIDs are given), narrowed
    to one site's studies when `site_id` is given."""
    scope = _SCOPE[("study", "series", "instance")[len(uids) - 1]]
    if site_id is None:
        return scope, list(uids)
    return f"{scope} AND st.site_id = ${len(uids) + 1}", [*uids, site_id]


async def stored_instances(
    pool: asyncpg.Pool, *uids: str, site_id: int | None = None
) -> list[StoredInstance]:
    """The instances of a study, a series or one instance (by how many UIDs are given), of
    one site only when `site_id` is given."""
    where, values = _where(uids, site_id)
    rows = await pool.fetch(
        "SELECT st.study_uid, se.series_uid, i.sop_uid, i.sop_class_uid, "
        "i.transfer_syntax_uid, i.blob_key, i.size_bytes, i.pixel_data_offset, "
        "i.pixel_data_length, i.number_of_frames, i.rows, i.columns, i.samples_per_pixel, "
        f"i.bits_allocated {_FROM} WHERE {where} {_ORDER}",
        *values,
    )
    return [StoredInstance(**dict(r)) for r in rows]


async def instance_metadata(
    pool: asyncpg.Pool, *uids: str, site_id: int | None = None
) -> list[bytes]:
    """The stored DICOM JSON of each instance in scope (of one site when `site_id` is given),
    in retrieval order."""
    where, values = _where(uids, site_id)
    rows = await pool.fetch(f"SELECT i.dicom_json {_FROM} WHERE {where} {_ORDER}", *values)
    return [r["dicom_json"] for r in rows]


async def site_by_name(pool: asyncpg.Pool, name: str) -> Site | None:
    """The index row of a configured site, or None before the archive first started with it."""
    row = await pool.fetchrow("SELECT id, name, siteid FROM site WHERE name = $1", name)
    return Site(row["id"], row["name"], row["siteid"]) if row is not None else None


async def patients_by_key(
    pool: asyncpg.Pool, site: Site, patient_keys: list[bytes]
) -> dict[bytes, Patient]:
    """The known patients of a site among `patient_keys` (keyed hashes of original IDs)."""
    rows = await pool.fetch(
        "SELECT patient_key, pk, pseudonym, date_offset_days FROM patient "
        "WHERE site_id = $1 AND patient_key = ANY($2::bytea[])",
        site.id, patient_keys,
    )
    return {
        bytes(r["patient_key"]): Patient(r["pk"], r["pseudonym"], r["date_offset_days"])
        for r in rows
    }
