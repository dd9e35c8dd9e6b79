"""Writes to the index: sites, pseudonymous patients, and one transaction per stored instance.

Locks are always taken in the same order (site; then study, series, the SOP Instance UID's
instance_uid row, instance, the study's modalities, the instance tally: migrations/014) so
concurrent writers of one study queue instead of deadlocking. The related-object counts live
in the instance tally, one row per series and session slot, so concurrent writers of one study
or series do not wait for each other's commit.
"""

from __future__ import annotations

import asyncio
import logging
import operator
import secrets
from collections.abc import Awaitable
from dataclasses import dataclass

import asyncpg

from ricord_archive.config import SiteConfig
from ricord_archive.deid.keys import PatientKeys
from ricord_archive.dicom.io import PixelDataLocation
from ricord_archive.dicom.json import InstanceRecord
from ricord_archive.errors import RefusedObject
from ricord_archive.index.database import translated, translating

log = logging.getLogger(__name__)

DATE_OFFSET_MAX_DAYS = 3650
# A transaction that PostgreSQL aborted as a deadlock victim (40P01) or for a serialization
# failure (40001) changed nothing and is run again, this many times in all at most.
TRANSIENT_ATTEMPTS = 5
_TRANSIENT = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)


_RELATIONAL_CONFLICT = "RI001"  # raised by the store_instance function


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
    """The outcome of the instance transaction: 'inserted', 'duplicate' (the SOP Instance UID
    was already stored; nothing changed) or 'replaced' (overwritten by policy)."""

    outcome: str
    sha256: bytes  # of the object stored before (for a duplicate or a replacement)
    replaced_blob_key: str | None = None  # the old blob to delete, now that the row moved on


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


@translating
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


@dataclass(frozen=True)
class PatientEntry:
    """A patient row: the patient and the keyed hashes it is filed under (`PatientKeys`)."""

    patient: Patient
    patient_key: bytes | None  # of (site, PatientID)
    issuer_key: bytes | None  # of (site, IssuerOfPatientID, PatientID)


PATIENT_COLUMNS = "pk, pseudonym, date_offset_days, patient_key, issuer_key"
_CLAIM = (
    f"UPDATE patient SET issuer_key = $2 WHERE site_id = $1 AND patient_key = $3 "
    f"AND issuer_key IS NULL RETURNING {PATIENT_COLUMNS}"
)
# The issuer-less key goes to the first patient of a PatientID only (see migrations/012).
_ALLOCATE = (
    "INSERT INTO patient (site_id, patient_key, issuer_key, pseudonym, date_offset_days) "
    "SELECT $1, CASE WHEN EXISTS (SELECT 1 FROM patient WHERE site_id = $1 AND patient_key = $2) "
    "THEN NULL ELSE $2::bytea END, $3, $4, $5 "
    f"RETURNING {PATIENT_COLUMNS}"
)


def patient_entry(row: asyncpg.Record) -> PatientEntry:
    def key(name: str) -> bytes | None:
        return None if row[name] is None else bytes(row[name])

    return PatientEntry(Patient(row["pk"], row["pseudonym"], row["date_offset_days"]),
                        key("patient_key"), key("issuer_key"))


@translating
async def patient_for(pool: asyncpg.Pool, site: Site, keys: PatientKeys) -> PatientEntry:
    """The patient filed under `keys.key`; else (an object naming an issuer) the patient that
    holds only the issuer-less `keys.legacy`, which this claims; else a new patient, its
    pseudonym and date offset allocated. Allocations and claims of a site run one at a time on
    every node (the site row's lock), so two senders at once never claim one patient twice."""
    column = "patient_key" if keys.legacy is None else "issuer_key"
    query = f"SELECT {PATIENT_COLUMNS} FROM patient WHERE site_id = $1 AND {column} = $2"
    async with pool.acquire() as conn:
        row = await conn.fetchrow(query, site.id, keys.key)
        if row is None:
            async with conn.transaction():
                await conn.execute("SELECT 1 FROM site WHERE id = $1 FOR UPDATE", site.id)
                row = await conn.fetchrow(query, site.id, keys.key)
                if row is None and keys.legacy is not None:
                    row = await conn.fetchrow(_CLAIM, site.id, keys.key, keys.legacy)
                if row is None:
                    number = await conn.fetchval(
                        "UPDATE site SET next_patient_number = next_patient_number + 1 "
                        "WHERE id = $1 RETURNING next_patient_number - 1",
                        site.id,
                    )
                    row = await conn.fetchrow(
                        _ALLOCATE, site.id, keys.legacy or keys.key,
                        None if keys.legacy is None else keys.key,
                        f"{site.siteid}-{number:06d}",
                        -(1 + secrets.randbelow(DATE_OFFSET_MAX_DAYS)),
                    )
    return patient_entry(row)


@translating
async def count_refusal(pool: asyncpg.Pool, site: Site, reason: str) -> None:
    await pool.execute(
        "INSERT INTO refusal (site_id, reason) VALUES ($1, $2) ON CONFLICT (site_id, reason) "
        "DO UPDATE SET count = refusal.count + 1, last_at = now()",
        site.id, reason,
    )


@translating
async def refusal_counts(pool: asyncpg.Pool) -> list[tuple[str, str, int]]:
    """(site name, reason, count) for every refusal reason seen."""
    rows = await pool.fetch(
        "SELECT site.name, r.reason, r.count FROM refusal r JOIN site ON site.id = r.site_id "
        "ORDER BY site.name, r.reason"
    )
    return [(r["name"], r["reason"], r["count"]) for r in rows]


@dataclass(frozen=True)
class _StoreCall:
    """What one call of the store_instance SQL function is made of."""

    site: Site
    patient: Patient
    new: NewInstance
    on_conflict: str

    @property
    def pixel_data_offset(self) -> int | None:
        return self.new.pixel_data.offset if self.new.pixel_data else None

    @property
    def pixel_data_length(self) -> int | None:
        return self.new.pixel_data.length if self.new.pixel_data else None


# The store_instance function's parameters (migrations/009, unchanged by 014), in its order,
# as paths into a _StoreCall: the one place the instance row is spelled out for the index.
_STORE_PARAMETERS = (
    "patient.pk", "site.id",
    "new.record.study_uid", "new.record.study_date", "new.record.study_time",
    "new.record.accession_number", "new.record.study_id", "new.record.patient_sex",
    "new.record.patient_age", "new.study_json",
    "new.record.series_uid", "new.record.modality", "new.record.series_number",
    "new.record.pps_start_date", "new.record.pps_start_time", "new.series_json",
    "new.record.sop_uid", "new.record.sop_class_uid", "new.record.instance_number",
    "new.transfer_syntax_uid", "new.blob_key", "new.size_bytes", "new.sha256",
    "new.instance_json", "pixel_data_offset", "pixel_data_length",
    "new.record.number_of_frames", "new.record.rows", "new.record.columns",
    "new.record.samples_per_pixel", "new.record.bits_allocated", "on_conflict",
)
_ARGUMENTS = operator.attrgetter(*_STORE_PARAMETERS)
_STORE = (
    "SELECT outcome, stored_sha256, replaced_blob_key FROM store_instance("
    + ", ".join(f"${n}" for n in range(1, len(_STORE_PARAMETERS) + 1)) + ")"
)


async def store_instance(
    pool: asyncpg.Pool, site: Site, patient: Patient, new: NewInstance, on_conflict: str,
    blob_written: Awaitable[object],
) -> StoredRow:
    """Index one instance once `blob_written` (the durable write of the instance's blob) has
    completed, so no committed row ever names a blob that is not on disk: one statement, the
    `store_instance` function of migrations/014, in a transaction of its own that has
    committed (durably) when this returns. One round trip instead of three (BEGIN, the
    function, COMMIT): measured cheaper in CPU than running the function while the blob is
    written (bench/index_store.py). A deadlock or serialization failure runs the transaction
    again (at most TRANSIENT_ATTEMPTS in all). If the write fails, its error is raised and the
    index is not touched. `on_conflict` is the duplicate policy for a re-sent SOP Instance UID
    with other content: 'keep-first', 'reject' or 'overwrite'."""
    await blob_written  # its OSError stays an OSError: the blob store's failure, not the index's
    arguments = _ARGUMENTS(_StoreCall(site, patient, new, on_conflict))
    attempt = 1
    async with translated():
        while True:
            try:
                row = await pool.fetchrow(_STORE, *arguments)
                break
            except _TRANSIENT as exc:
                if attempt >= TRANSIENT_ATTEMPTS:
                    raise
                log.info("instance transaction aborted (%s), attempt %d of %d: running it "
                         "again", exc.sqlstate, attempt, TRANSIENT_ATTEMPTS)
                attempt += 1
                await asyncio.sleep(0.01 * 2**attempt)
            except asyncpg.PostgresError as exc:
                if getattr(exc, "sqlstate", None) == _RELATIONAL_CONFLICT:
                    raise RefusedObject(exc.args[0] if exc.args else "relational conflict",
                                        "relational-mismatch") from None
                raise
    return StoredRow(row["outcome"], row["stored_sha256"], row["replaced_blob_key"])
