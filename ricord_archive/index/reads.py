"""Reads from the index: query answers, the locations and metadata of stored instances, and
the site and patient rows the offline tools look up (never allocating anything)."""

from __future__ import annotations

from dataclasses import fields

import asyncpg

from ricord_archive.deid.keys import PatientKeys
from ricord_archive.index.database import translating
from ricord_archive.index.store import PATIENT_COLUMNS, Patient, Site, patient_entry
from ricord_archive.instances import StoredInstance

# The columns of a StoredInstance, named after its fields: the study's and series' UIDs from
# their tables, the rest from the instance row.
_TABLE_OF = {"study_uid": "st", "series_uid": "se"}
_STORED_COLUMNS = ", ".join(
    f"{_TABLE_OF.get(f.name, 'i')}.{f.name}" for f in fields(StoredInstance)
)
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


@translating
async def stored_instances(
    pool: asyncpg.Pool, *uids: str, site_id: int | None = None
) -> list[StoredInstance]:
    """The instances of a study, a series or one instance (by how many UIDs are given), of
    one site only when `site_id` is given."""
    where, values = _where(uids, site_id)
    rows = await pool.fetch(
        f"SELECT {_STORED_COLUMNS} {_FROM} WHERE {where} {_ORDER}",
        *values,
    )
    return [StoredInstance(**dict(r)) for r in rows]


@translating
async def instance_metadata(
    pool: asyncpg.Pool, *uids: str, site_id: int | None = None
) -> list[bytes]:
    """The stored DICOM JSON of each instance in scope (of one site when `site_id` is given),
    in retrieval order."""
    where, values = _where(uids, site_id)
    rows = await pool.fetch(f"SELECT i.dicom_json {_FROM} WHERE {where} {_ORDER}", *values)
    return [r["dicom_json"] for r in rows]


@translating
async def site_by_name(pool: asyncpg.Pool, name: str) -> Site | None:
    """The index row of a configured site, or None before the archive first started with it."""
    row = await pool.fetchrow("SELECT id, name, siteid FROM site WHERE name = $1", name)
    return Site(row["id"], row["name"], row["siteid"]) if row is not None else None


@translating
async def study_owner(pool: asyncpg.Pool, study_uid: str) -> tuple[Site, Patient] | None:
    """The site and patient a stored study is filed under, None when the index has no such
    study."""
    row = await pool.fetchrow(
        "SELECT site.id, site.name, site.siteid, p.pk, p.pseudonym, p.date_offset_days "
        "FROM study st JOIN site ON site.id = st.site_id JOIN patient p ON p.pk = st.patient_pk "
        "WHERE st.study_uid = $1",
        study_uid,
    )
    if row is None:
        return None
    return (Site(row["id"], row["name"], row["siteid"]),
            Patient(row["pk"], row["pseudonym"], row["date_offset_days"]))


@translating
async def known_patients(
    pool: asyncpg.Pool, site: Site, wanted: list[PatientKeys]
) -> list[Patient | None]:
    """The patient each of `wanted` names at a site, as `store.patient_for` would find or
    claim it, without allocating or claiming anything; None for a patient the index does not
    know."""
    issuer_keys = [k.key for k in wanted if k.legacy is not None]
    plain_keys = [k.legacy or k.key for k in wanted]
    rows = [patient_entry(r) for r in await pool.fetch(
        f"SELECT {PATIENT_COLUMNS} FROM patient WHERE site_id = $1 "
        "AND (issuer_key = ANY($2::bytea[]) OR patient_key = ANY($3::bytea[]))",
        site.id, issuer_keys, plain_keys,
    )]
    by_issuer_key = {e.issuer_key: e.patient for e in rows if e.issuer_key is not None}
    by_plain_key = {e.patient_key: e for e in rows if e.patient_key is not None}

    def found(keys: PatientKeys) -> Patient | None:
        if keys.legacy is None:
            entry = by_plain_key.get(keys.key)
            return None if entry is None else entry.patient
        if keys.key in by_issuer_key:
            return by_issuer_key[keys.key]
        claimable = by_plain_key.get(keys.legacy)
        return claimable.patient if claimable is not None and claimable.issuer_key is None \
            else None

    return [found(k) for k in wanted]
