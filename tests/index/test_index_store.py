"""The instance transaction (`store_instance`, migrations/009) on the embedded PostgreSQL:
counts QIDO-RS and C-FIND answer stay exact under concurrent sessions, duplicates, overwrites
and relational conflicts; the study row is written only when what it shows changes; the
migration carries the counts of an existing index over."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
from collections.abc import Iterator
from dataclasses import replace

import asyncpg
import pytest

from ricord_archive.audit_trail import Action, Actor, AuditEvent, EventId, Outcome
from ricord_archive.config import SiteConfig
from ricord_archive.deid import PatientKeys
from ricord_archive.dicom.io import PixelDataLocation
from ricord_archive.dicom.json import InstanceRecord
from ricord_archive.errors import IndexFailure, IndexUnavailable, RefusedObject
from ricord_archive.index.audit_rows import AuditFilter, AuditRows, AuditWriter
from ricord_archive.index.cohorts import CohortRows
from ricord_archive.index.database import create_pool
from ricord_archive.index.import_rows import ImportRows
from ricord_archive.index.migrate import load_migrations, migrate
from ricord_archive.index.search import search
from ricord_archive.index.store import (
    _STORE_PARAMETERS,
    NewInstance,
    Patient,
    Site,
    StoredRow,
    count_refusal,
    ensure_site,
    patient_for,
    store_instance,
)
from ricord_archive.search.model import Level, Query
from tests.conftest import fresh_database

CT = "1.2.840.10008.5.1.4.1.1.2"
ROOT = "1.2.826.0.1.3680043.10.999"


def instance(study: int, series: int, number: int, modality: str = "CT",
             content: bytes = b"") -> NewInstance:
    record = InstanceRecord(
        study_uid=f"{ROOT}.1.{study}", series_uid=f"{ROOT}.2.{series}",
        sop_uid=f"{ROOT}.3.{number}", sop_class_uid=CT, modality=modality,
        study_date=dt.date(2021, 2, 3), study_time=None, accession_number=None, study_id=None,
        patient_sex="F", patient_age=None, series_number=series, pps_start_date=None,
        pps_start_time=None, instance_number=number, number_of_frames=1, rows=2, columns=2,
        samples_per_pixel=1, bits_allocated=16,
    )
    digest = hashlib.sha256(record.sop_uid.encode() + content).digest()
    return NewInstance(record, "1.2.840.10008.1.2.1", digest.hex(), 100, digest,
                       PixelDataLocation(90, 8), b'{"study": 1}', b'{"series": 1}', b"{}")


async def _written() -> None:
    """The blob write the transaction waits for: done at once here."""


class Index:
    def __init__(self, pool: asyncpg.Pool, site: Site) -> None:
        self.pool, self.site = pool, site

    async def patient(self, key: bytes) -> Patient:
        return (await patient_for(self.pool, self.site, PatientKeys(key, None))).patient

    async def store(self, patient: Patient, new: NewInstance,
                    on_conflict: str = "keep-first") -> StoredRow:
        return await store_instance(self.pool, self.site, patient, new, on_conflict, _written())

    async def counts(self, level: Level) -> list[tuple[int, ...]]:
        """The counts a QIDO-RS / C-FIND answer at `level` holds, row by row."""
        columns = {Level.PATIENT: ("num_studies", "num_series", "num_instances"),
                   Level.STUDY: ("num_series", "num_instances"), Level.SERIES: ("num_instances",)}
        page = await search(self.pool, Query(level, limit=100))
        return [tuple(getattr(row, name) for name in columns[level]) for row in page.rows]


@pytest.fixture
def index(cluster: str, request) -> Iterator:
    """Run `scenario(Index)` on a freshly migrated database of its own."""
    def run(scenario, migrations=None, isolation: str = "read committed") -> object:
        async def go() -> object:
            name = request.node.name.replace("[", "-").replace("]", "")[-60:]
            url = await fresh_database(cluster, name)
            conn = await asyncpg.connect(url)
            try:  # a configured server may default to another isolation level
                await conn.execute(f"ALTER DATABASE \"{name}\" "
                                   f"SET default_transaction_isolation = '{isolation}'")
            finally:
                await conn.close()
            pool = await create_pool(url)
            try:
                async with pool.acquire() as conn:
                    await migrate(conn, migrations)
                    site = await ensure_site(conn, SiteConfig("site-a"))
                return await scenario(Index(pool, site))
            finally:
                await pool.close()
        return asyncio.run(go())
    return run


@pytest.mark.parametrize("isolation", ["read committed", "repeatable read"])
def test_counts_stay_exact_with_concurrent_sessions_and_resends(index, isolation):
    async def scenario(ix: Index) -> None:
        patient = await ix.patient(b"p" * 32)
        objects = [instance(1, 1 + n % 2, n) for n in range(40)]
        objects += [instance(2, 3, 100 + n) for n in range(5)]

        async def sender(share: list[NewInstance], number: int) -> list[str]:
            # each send has a blob of its own, as in ingest
            return [(await ix.store(patient, replace(new, blob_key=f"{new.blob_key}{number}")))
                    .outcome for new in share]

        # 6 sessions at once, each sending every object once: each is stored once
        connections = [await ix.pool.acquire() for _ in range(6)]  # all open before
        for conn in connections:
            await ix.pool.release(conn)
        outcomes = await asyncio.gather(*(sender(objects[k:] + objects[:k], k)
                                          for k in range(0, 36, 6)))
        flat = [outcome for per_sender in outcomes for outcome in per_sender]
        assert flat.count("inserted") == len(objects)
        assert flat.count("duplicate") == 5 * len(objects)
        if isolation == "read committed":  # (under repeatable read most sessions retry)
            slots = await ix.pool.fetchval("SELECT count(DISTINCT slot) FROM instance_tally")
            assert slots > 1  # the sessions added to rows of their own
        assert await ix.counts(Level.PATIENT) == [(2, 3, 45)]
        assert sorted(await ix.counts(Level.STUDY)) == [(1, 5), (2, 40)]
        assert sorted(await ix.counts(Level.SERIES)) == [(5,), (20,), (20,)]
        assert await ix.pool.fetchval("SHOW transaction_isolation") == isolation

    index(scenario, isolation=isolation)


def test_study_row_written_only_when_its_modalities_grow(index):
    async def scenario(ix: Index) -> None:
        patient = await ix.patient(b"p" * 32)
        await ix.store(patient, instance(1, 1, 1, "CT"))
        version = "SELECT xmin::text, ctid::text, modalities FROM study"
        first = await ix.pool.fetchrow(version)
        assert first["modalities"] == ["CT"]
        for number in range(2, 6):
            await ix.store(patient, instance(1, 1 + number % 2, number, "CT"))
        assert await ix.pool.fetchrow(version) == first  # the same row version
        # new modalities from concurrent sessions: each is added once, none is lost
        await asyncio.gather(*(ix.store(patient, instance(1, 10 + n, 10 + n, modality))
                               for n, modality in enumerate(["MR", "PT", "MR", "PT", "SR"])))
        assert sorted(await ix.pool.fetchval("SELECT modalities FROM study")) == [
            "CT", "MR", "PT", "SR"]
        assert await ix.counts(Level.STUDY) == [(7, 10)]

    index(scenario)


def test_conflicts_and_the_duplicate_policy_leave_counts_alone(index):
    async def scenario(ix: Index) -> None:
        first, second = await ix.patient(b"p" * 32), await ix.patient(b"q" * 32)
        assert (await ix.store(first, instance(1, 1, 1))).outcome == "inserted"
        for patient, new, message in (
            (second, instance(1, 2, 2), "Study Instance UID already stored under another"),
            (first, instance(2, 1, 3), "Series Instance UID already stored under another"),
            (first, instance(1, 2, 1), "SOP Instance UID already stored under another"),
        ):
            with pytest.raises(RefusedObject, match=message) as refused:
                await ix.store(patient, new)
            assert refused.value.reason == "relational-mismatch"
        changed = instance(1, 1, 1, content=b"other")
        kept = await ix.store(first, changed, "keep-first")
        assert (kept.outcome, kept.replaced_blob_key) == ("duplicate", None)
        assert kept.sha256 == instance(1, 1, 1).sha256
        replaced = await ix.store(first, changed, "overwrite")
        assert replaced.outcome == "replaced"
        assert replaced.replaced_blob_key == instance(1, 1, 1).blob_key
        again = await ix.store(first, changed, "overwrite")
        assert (again.outcome, again.sha256) == ("duplicate", changed.sha256)
        assert await ix.counts(Level.PATIENT) == [(1, 1, 1), (0, 0, 0)]
        assert await ix.counts(Level.STUDY) == [(1, 1)]
        assert await ix.pool.fetchval("SELECT count(*) FROM series") == 1

    index(scenario)


def test_index_failures_are_its_own_and_a_blob_write_failure_stays_an_os_error(index):
    async def failed_write() -> None:
        raise OSError("no space left on device")

    async def scenario(ix: Index) -> None:
        arguments = await ix.pool.fetchval(
            "SELECT pronargs FROM pg_proc WHERE proname = 'store_instance'")
        assert arguments == len(_STORE_PARAMETERS)
        patient = await ix.patient(b"p" * 32)
        with pytest.raises(OSError) as failed:
            await store_instance(ix.pool, ix.site, patient, instance(1, 1, 1), "keep-first",
                                 failed_write())
        assert not isinstance(failed.value, IndexFailure)
        assert await ix.pool.fetchval("SELECT count(*) FROM instance") == 0
        with pytest.raises(IndexFailure) as refused:  # no such site: a refused statement
            await count_refusal(ix.pool, replace(ix.site, id=ix.site.id + 1000), "refused")
        assert not isinstance(refused.value, IndexUnavailable)
        assert isinstance(refused.value.__cause__, asyncpg.PostgresError)
        await ix.pool.close()
        with pytest.raises(IndexUnavailable):
            await ix.store(patient, instance(1, 1, 1))

    index(scenario)


def test_import_cohort_and_audit_rows_fail_with_the_index_own_errors(index):
    """Import sessions, cohorts and the audit trail translate the driver's errors too; the
    audit writer keeps its events while the index is unavailable."""
    event = AuditEvent(EventId.IMPORT, Action.CREATE, Outcome.SUCCESS,
                       Actor("tester", "admin", None, "127.0.0.1"), "CLI")

    async def scenario(ix: Index) -> None:
        with pytest.raises(IndexFailure) as refused:  # no such site
            await ImportRows(ix.pool).open_session(ix.site.id + 1000, "PACS", 60.0)
        assert not isinstance(refused.value, IndexUnavailable)
        audit = AuditRows(ix.pool)
        writer = AuditWriter(audit)
        writer.record(event)
        await writer.flush()
        assert [e["who"] for e in await audit.read_events(AuditFilter())] == ["tester"]
        await ix.pool.close()
        for call in (ImportRows(ix.pool).importing_aets(), CohortRows(ix.pool).list_cohorts(None),
                     audit.read_events(AuditFilter())):
            with pytest.raises(IndexUnavailable):
                await call
        writer.record(event)
        await writer.flush()
        assert (writer.buffered, writer.dropped) == (1, 0)

    index(scenario)


def test_migration_carries_the_counts_of_an_existing_index_over(index):
    everything = load_migrations()
    before = [m for m in everything if m.version < 9]
    assert next(m.version for m in everything if m.version >= 9) == 9

    async def scenario(ix: Index) -> None:
        pseudonym = f"{ix.site.siteid}-000001"  # allocated as before migrations/012
        patient = Patient(await ix.pool.fetchval(
            "INSERT INTO patient (site_id, patient_key, pseudonym, date_offset_days) "
            "VALUES ($1, $2, $3, -1) RETURNING pk", ix.site.id, b"p" * 32, pseudonym),
            pseudonym, -1)
        places = [(1, 1)] * 3 + [(1, 2)] * 2 + [(2, 3)] * 2  # (study, series)
        for number, (study, series) in enumerate(places):  # stored as migrations/007 does
            await ix.store(patient, instance(study, series, number))
        old = await ix.pool.fetchrow("SELECT num_studies, num_series, num_instances "
                                     "FROM patient")
        assert tuple(old) == (2, 3, 7)
        async with ix.pool.acquire() as conn:
            await migrate(conn, everything)
        await ix.pool.expire_connections()  # plans of the old function and columns
        assert await ix.counts(Level.PATIENT) == [(2, 3, 7)]
        assert await ix.counts(Level.STUDY) == [(2, 5), (1, 2)]
        assert await ix.counts(Level.SERIES) == [(3,), (2,), (2,)]
        await ix.store(patient, instance(2, 4, 8))
        assert await ix.counts(Level.STUDY) == [(2, 5), (2, 3)]

    index(scenario, before)

