"""IngestService, QueryService and RetrieveService in-process, over the composition root
`archive.compose_services` and the embedded PostgreSQL: no server subprocess, no protocol (the
protocol tests keep their subprocesses)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import io
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest

from ricord_archive.archive import ArchiveServices, compose_services, database
from ricord_archive.audit_trail import Action, Actor, AuditEvent, Outcome
from ricord_archive.config import Config, Limits
from ricord_archive.deid import Keyring
from ricord_archive.errors import InvalidObject, NotFound, ObjectTooLarge, StorageUnavailable
from ricord_archive.index.database import Pool, create_pool
from ricord_archive.index.migrate import instance_partitions, migrate
from ricord_archive.search.model import Level, Query, Scope
from tests.conftest import fresh_database
from tests.phi_corpus import PhiCorpus

KEY = b"in-process services test key 32b"
OPERATOR = Actor("tester", "operator", None, "localhost")


class Recording:
    """An audit trail that keeps its events."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def record(self, event: AuditEvent) -> None:
        self.events.append(event)


Scenario = Callable[[ArchiveServices, Recording, Pool], Awaitable[None]]


@pytest.fixture
def services(cluster: str, tmp_path: Path, request) -> Iterator[Callable[..., None]]:
    """Run `scenario(services, trail, pool)` over a fresh index and blob store; `limits` as
    given."""
    def run(scenario: Scenario, limits: Limits | None = None) -> None:
        async def go() -> None:
            url = await fresh_database(cluster, request.node.name[-60:])
            pool = await create_pool(url, max_size=4)
            try:
                async with pool.acquire() as conn:
                    await migrate(conn)
                config = Config(data_dir=tmp_path / "data", audit=False,
                                limits=limits or Limits())
                trail = Recording()
                async with compose_services(config, pool, Keyring(KEY)) as core:
                    ingest = replace_trail(core, trail)
                    await scenario(ingest, trail, pool)
            finally:
                await pool.close()
        asyncio.run(go())
    yield run


def replace_trail(core: ArchiveServices, trail: Recording) -> ArchiveServices:
    """The services with `trail` as the audit trail ingest writes to."""
    core.ingest.trail = trail
    return replace(core, audit=trail)


def study_files(tmp_path: Path, slices: int = 3) -> tuple[list[bytes], PhiCorpus]:
    corpus = PhiCorpus(seed=20261205, out_dir=tmp_path / "corpus")
    files = corpus.study(corpus.patient(), dt.date(2020, 5, 17), slices=slices)
    return [f.read_bytes() for f in files], corpus


def test_ingest_query_retrieve_in_process(services, tmp_path):
    objects, corpus = study_files(tmp_path)

    async def scenario(core: ArchiveServices, trail: Recording, pool: Pool) -> None:
        results = [await core.ingest.store(data, "default", by=OPERATOR, protocol="test")
                   for data in objects]
        again = await core.ingest.store(objects[0], "default", by=OPERATOR, protocol="test")
        assert [r.duplicate for r in results] == [False, False, False] and again.duplicate
        study = results[0].study_uid
        assert {r.study_uid for r in results} == {study}

        studies = await core.query.search(Query(Level.STUDY, limit=10))
        assert [d["0020000D"]["Value"] for d in studies.documents] == [[study]]
        assert studies.documents[0]["00201208"]["Value"] == [3]  # NumberOfStudyRelatedInstances
        instances = await core.query.search(
            Query(Level.INSTANCE, scope=Scope(study_uids=(study,)), limit=10))
        assert sorted(d["00080018"]["Value"][0] for d in instances.documents) == sorted(
            r.sop_uid for r in results)

        stored = await core.retrieve.instances(study)
        assert sorted(item.sop_uid for item, _ in stored) == sorted(r.sop_uid for r in results)
        for item, blob in stored:
            dataset = pydicom.dcmread(io.BytesIO(await core.retrieve.stored_bytes(blob)))
            assert dataset.SOPInstanceUID == item.sop_uid
            assert not {str(dataset.PatientName), dataset.PatientID} & corpus.corpus.planted
        with pytest.raises(NotFound):
            await core.retrieve.instances("2.25.1")

        stored_events = [e for e in trail.events if e.sop_uid in {r.sop_uid for r in results}]
        assert [(e.action, e.outcome, e.protocol, e.site, e.actor) for e in stored_events] == [
            *[(Action.CREATE, Outcome.SUCCESS, "test", "default", OPERATOR)] * 3,
            (Action.READ, Outcome.SUCCESS, "test", "default", OPERATOR),  # the re-sent one
        ]

    services(scenario)


def test_ingest_audits_refusals_in_process(services, tmp_path):
    objects, _ = study_files(tmp_path, slices=1)

    async def scenario(core: ArchiveServices, trail: Recording, pool: Pool) -> None:
        with pytest.raises(InvalidObject):
            await core.ingest.store(b"not DICOM at all", "default", by=OPERATOR, protocol="t")
        with pytest.raises(ObjectTooLarge):
            await core.ingest.store(objects[0], "default", by=OPERATOR, protocol="t")
        assert [(e.outcome, e.detail["reason"]) for e in trail.events] == [
            (Outcome.MINOR_FAILURE, "InvalidObject"), (Outcome.MINOR_FAILURE, "ObjectTooLarge"),
        ]
        assert (await core.query.search(Query(Level.STUDY, limit=10))).documents == []

    services(scenario, limits=Limits(max_object_bytes=len(objects[0]) - 1))


def test_store_own_is_audited_in_process(services, tmp_path):
    objects, _ = study_files(tmp_path, slices=1)

    async def scenario(core: ArchiveServices, trail: Recording, pool: Pool) -> None:
        stored = await core.ingest.store(objects[0], "default", by=OPERATOR, protocol="t")
        [(_, blob)] = await core.retrieve.instances(stored.study_uid)
        own = pydicom.dcmread(io.BytesIO(await core.retrieve.stored_bytes(blob)))
        own.SOPInstanceUID = own.file_meta.MediaStorageSOPInstanceUID = "2.25.77"
        assert await core.ingest.store_own(own, by=OPERATOR, protocol="own") == "inserted"
        own.StudyInstanceUID = "2.25.78"
        with pytest.raises(NotFound):
            await core.ingest.store_own(own, by=OPERATOR, protocol="own")
        assert [(e.action, e.outcome, e.site, e.sop_uid) for e in trail.events
                if e.protocol == "own"] == [
            (Action.CREATE, Outcome.SUCCESS, "default", "2.25.77"),
            (Action.CREATE, Outcome.MINOR_FAILURE, None, None),
        ]

    services(scenario)


def test_lost_index_is_storage_unavailable_in_process(services, tmp_path):
    objects, _ = study_files(tmp_path, slices=1)

    async def scenario(core: ArchiveServices, trail: Recording, pool: Pool) -> None:
        await pool.close()
        with pytest.raises(StorageUnavailable):
            await core.ingest.store(objects[0], "default", by=OPERATOR, protocol="t")
        with pytest.raises(StorageUnavailable):
            await core.query.search(Query(Level.STUDY, limit=10))
        assert [e.detail["reason"] for e in trail.events] == ["StorageUnavailable"]

    services(scenario)


def test_a_failed_blob_write_on_the_loop_stores_nothing(services, tmp_path, monkeypatch):
    """A lone small object is written on the event loop's thread (`IngestService._write`); a
    failed flush there is a failed store, indexes nothing, and the next store goes on."""
    objects, _ = study_files(tmp_path, slices=2)
    flushed_on: list[threading.Thread] = []
    real = os.fdatasync

    def failing_once(fd: int) -> None:
        flushed_on.append(threading.current_thread())
        if len(flushed_on) == 1:
            raise OSError(5, "I/O error")
        real(fd)

    async def scenario(core: ArchiveServices, trail: Recording, pool: Pool) -> None:
        monkeypatch.setattr(os, "fdatasync", failing_once)
        with pytest.raises(StorageUnavailable):
            await core.ingest.store(objects[0], "default", by=OPERATOR, protocol="t")
        assert flushed_on == [threading.main_thread()]  # the loop's own thread
        assert await pool.fetchval("SELECT count(*) FROM instance") == 0
        stored = await core.ingest.store(objects[1], "default", by=OPERATOR, protocol="t")
        assert not stored.duplicate
        assert await pool.fetchval("SELECT count(*) FROM instance") == 1
        assert [e.outcome for e in trail.events] == [Outcome.SERIOUS_FAILURE, Outcome.SUCCESS]

    services(scenario)


def test_a_large_blob_hashed_beside_its_write_is_indexed_with_its_digest(services, tmp_path):
    """Alone, a large blob is hashed in one thread while another writes it: the index holds the
    SHA-256 of the bytes stored, so the same object sent again is a plain duplicate."""
    corpus = PhiCorpus(seed=20261206, out_dir=tmp_path / "corpus")
    [large] = corpus.study(corpus.patient(), dt.date(2020, 5, 18), slices=1, size=256)
    data = large.read_bytes()
    assert len(data) > 2 * 64 * 1024

    async def scenario(core: ArchiveServices, trail: Recording, pool: Pool) -> None:
        stored = await core.ingest.store(data, "default", by=OPERATOR, protocol="t")
        row = await pool.fetchrow("SELECT blob_key, sha256, size_bytes FROM instance")
        with core.blobs.open(row["blob_key"]) as blob:
            written = blob.read()
        assert len(written) == row["size_bytes"]
        assert hashlib.sha256(written).digest() == row["sha256"]
        again = await core.ingest.store(data, "default", by=OPERATOR, protocol="t")
        assert (again.duplicate, again.warning, again.sop_uid) == (True, None, stored.sop_uid)

    services(scenario)


def test_the_pool_has_the_configured_size(cluster, tmp_path, request):
    async def go() -> None:
        url = await fresh_database(cluster, request.node.name[-60:])
        config = Config(data_dir=tmp_path / "data", database_url=url, db_pool_size=3)
        async with database(config) as pool:
            assert pool.get_max_size() == 3

    asyncio.run(go())


def test_the_index_gets_the_configured_partitions_and_keeps_them(cluster, tmp_path, request,
                                                                  caplog):
    async def go() -> None:
        url = await fresh_database(cluster, request.node.name[-60:])
        config = Config(data_dir=tmp_path / "data", database_url=url, instance_partitions=3)
        with caplog.at_level(logging.WARNING, logger="ricord_archive.index.migrate"):
            async with database(config) as pool, pool.acquire() as conn:
                assert await instance_partitions(conn) == 3
            assert not caplog.records
            later = replace(config, instance_partitions=8)
            async with database(later, primary=False) as pool, pool.acquire() as conn:
                assert await instance_partitions(conn) == 3
            assert not caplog.records  # a server's worker process leaves it to the primary
            async with database(later):
                pass
        [warning] = caplog.records
        assert "instance_partitions = 8 is configured" in warning.getMessage()
        assert "created with 3 instance partitions" in warning.getMessage()

    asyncio.run(go())
