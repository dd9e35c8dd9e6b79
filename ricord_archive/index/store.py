"""Writes to the index: sites, pseudonymous patients, and one transaction per stored instance.

Locks are always taken in the same order (site, then study, series, instance) so concurrent
writers of one study queue instead of deadlocking.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import asyncpg

from ricord_archive.config import SiteConfig
from ricord_archive.dicom_io import PixelDataLocation
from ricord_archive.dicom_json import InstanceRecord
from ricord_archive.errors import RefusedObject

DATE_OFFSET_MAX_DAYS = 3650


class SiteConflict(RuntimeError):
    """A pinned SITEID contradicts what the index already holds."""


@dataclass(frozen=True)
class Site:
    id: int
    name: str
    siteid: str


@dataclass(frozen=True)
class Patient:
    pk: int
    pseudonym: str
    date_offset_days: int


@dataclass(frozen=True)
class StoredRow:
    """The outcome of the instance transaction."""

    inserted: bool  # False: the SOP Instance UID was already stored (nothing changed)
    sha256: bytes  # of the stored object (the earlier one for a duplicate)


@dataclass(frozen=True)
class NewInstance:
    record: InstanceRecord
    transfer_syntax_uid: str
    blob_key: str
    size_bytes: int
    sha256: bytes
    pixel_data: PixelDataLocation | None
    study_json: bytes
    series_json: bytes
    instance_json: bytes


async def ensure_site(conn: asyncpg.Connection, site: SiteConfig) -> Site:
    """The index row of a configured site; a new site gets a fresh random SITEID."""
    row = await conn.fetchrow("SELECT id, name, siteid FROM site WHERE name = $1", site.name)
    if row is not None:
        if site.siteid and row["siteid"] != site.siteid:
            raise SiteConflict(
                f"site {site.name!r} already has SITEID {row['siteid']}; the configuration pins "
                f"{site.siteid}, and a SITEID never changes"
            )
        return Site(row["id"], row["name"], row["siteid"])
    for _ in range(50):
        siteid = site.siteid or str(100000 + secrets.randbelow(900000))
        try:
            row = await conn.fetchrow(
                "INSERT INTO site (name, siteid) VALUES ($1, $2) "
                "ON CONFLICT (name) DO NOTHING RETURNING id, name, siteid",
                site.name, siteid,
            )
        except asyncpg.UniqueViolationError as exc:
            if site.siteid:
                raise SiteConflict(f"SITEID {site.siteid} belongs to another site") from exc
            continue  # random SITEID taken: draw again
        if row is None:  # another node created it meanwhile
            return await ensure_site(conn, site)
        return Site(row["id"], row["name"], row["siteid"])
    raise SiteConflict("could not draw an unused SITEID")


async def patient_for(pool: asyncpg.Pool, site: Site, patient_key: bytes) -> Patient:
    """The patient's pseudonym and date offset, allocated on first sight (once per site)."""
    query = (
        "SELECT pk, pseudonym, date_offset_days FROM patient "
        "WHERE site_id = $1 AND patient_key = $2"
    )
    async with pool.acquire() as conn:
        row = await conn.fetchrow(query, site.id, patient_key)
        if row is None:
            async with conn.transaction():
                await conn.execute("SELECT 1 FROM site WHERE id = $1 FOR UPDATE", site.id)
                row = await conn.fetchrow(query, site.id, patient_key)
                if row is None:
                    number = await conn.fetchval(
                        "UPDATE site SET next_patient_number = next_patient_number + 1 "
                        "WHERE id = $1 RETURNING next_patient_number - 1",
                        site.id,
                    )
                    row = await conn.fetchrow(
                        "INSERT INTO patient (site_id, patient_key, pseudonym, date_offset_days) "
                        "VALUES ($1, $2, $3, $4) RETURNING pk, pseudonym, date_offset_days",
                        site.id, patient_key, f"{site.siteid}-{number:06d}",
                        -(1 + secrets.randbelow(DATE_OFFSET_MAX_DAYS)),
                    )
    return Patient(row["pk"], row["pseudonym"], row["date_offset_days"])


async def count_refusal(pool: asyncpg.Pool, site: Site, reason: str) -> None:
    await pool.execute(
        "INSERT INTO refusal (site_id, reason) VALUES ($1, $2) ON CONFLICT (site_id, reason) "
        "DO UPDATE SET count = refusal.count + 1, last_at = now()",
        site.id, reason,
    )


async def refusal_counts(pool: asyncpg.Pool) -> list[tuple[str, str, int]]:
    """(site name, reason, count) for every refusal reason seen."""
    rows = await pool.fetch(
        "SELECT site.name, r.reason, r.count FROM refusal r JOIN site ON site.id = r.site_id "
        "ORDER BY site.name, r.reason"
    )
    return [(r["name"], r["reason"], r["count"]) for r in rows]


async def _existing(conn: asyncpg.Connection, sop_uid: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT i.sha256, se.series_uid, st.study_uid FROM instance i "
        "JOIN series se ON se.pk = i.series_pk JOIN study st ON st.pk = i.study_pk "
        "WHERE i.sop_uid = $1",
        sop_uid,
    )


def _duplicate(row: asyncpg.Record, record: InstanceRecord) -> StoredRow:
    if row["study_uid"] != record.study_uid or row["series_uid"] != record.series_uid:
        raise RefusedObject(
            "SOP Instance UID already stored under another study or series", "relational-mismatch"
        )
    return StoredRow(inserted=False, sha256=row["sha256"])


async def store_instance(
    pool: asyncpg.Pool, site: Site, patient: Patient, new: NewInstance
) -> StoredRow:
    """Index one instance whose blob is already written, in one transaction."""
    rec = new.record
    async with pool.acquire() as conn, conn.transaction():
        row = await _existing(conn, rec.sop_uid)
        if row is not None:
            return _duplicate(row, rec)
        study = await conn.fetchrow(
            "INSERT INTO study (patient_pk, site_id, study_uid, study_date, study_time, "
            "accession_number, study_id, patient_sex, patient_age, dicom_json) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
            "ON CONFLICT (study_uid) DO UPDATE SET updated_at = now() "
            "RETURNING pk, patient_pk, (xmax = 0) AS created",
            patient.pk, site.id, rec.study_uid, rec.study_date, rec.study_time,
            rec.accession_number, rec.study_id, rec.patient_sex, rec.patient_age,
            new.study_json,
        )
        if study["patient_pk"] != patient.pk:
            raise RefusedObject(
                "Study Instance UID already stored under another patient", "relational-mismatch"
            )
        series = await conn.fetchrow(
            "INSERT INTO series (study_pk, series_uid, modality, series_number, pps_start_date, "
            "pps_start_time, dicom_json) VALUES ($1, $2, $3, $4, $5, $6, $7) "
            "ON CONFLICT (series_uid) DO UPDATE SET modality = series.modality "
            "RETURNING pk, study_pk, (xmax = 0) AS created",
            study["pk"], rec.series_uid, rec.modality, rec.series_number, rec.pps_start_date,
            rec.pps_start_time, new.series_json,
        )
        if series["study_pk"] != study["pk"]:
            raise RefusedObject(
                "Series Instance UID already stored under another study", "relational-mismatch"
            )
        pixels = new.pixel_data
        inserted = await conn.fetchval(
            "INSERT INTO instance (series_pk, study_pk, sop_uid, sop_class_uid, instance_number, "
            "transfer_syntax_uid, blob_key, size_bytes, sha256, dicom_json, pixel_data_offset, "
            "pixel_data_length, number_of_frames, rows, columns, samples_per_pixel, "
            "bits_allocated) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) "
            "ON CONFLICT (sop_uid) DO NOTHING RETURNING pk",
            series["pk"], study["pk"], rec.sop_uid, rec.sop_class_uid, rec.instance_number,
            new.transfer_syntax_uid, new.blob_key, new.size_bytes, new.sha256,
            new.instance_json, pixels.offset if pixels else None,
            pixels.length if pixels else None, rec.number_of_frames, rec.rows, rec.columns,
            rec.samples_per_pixel, rec.bits_allocated,
        )
        if inserted is None:  # a concurrent writer stored it first
            row = await _existing(conn, rec.sop_uid)
            return _duplicate(row, rec)
        await conn.execute(
            "UPDATE series SET num_instances = num_instances + 1 WHERE pk = $1", series["pk"]
        )
        await conn.execute(
            "UPDATE study SET num_instances = num_instances + 1, "
            "num_series = num_series + $2::int, "
            "modalities = CASE WHEN $3::text IS NULL OR $3 = ANY (modalities) THEN modalities "
            "ELSE array_append(modalities, $3) END, updated_at = now() WHERE pk = $1",
            study["pk"], 1 if series["created"] else 0, rec.modality,
        )
        await conn.execute(
            "UPDATE patient SET num_instances = num_instances + 1, "
            "num_series = num_series + $2::int, num_studies = num_studies + $3::int "
            "WHERE pk = $1",
            patient.pk, 1 if series["created"] else 0, 1 if study["created"] else 0,
        )
    return StoredRow(inserted=True, sha256=new.sha256)
