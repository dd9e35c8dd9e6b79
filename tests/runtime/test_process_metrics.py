"""Gauges and counters of one process's index connections: the pool counts the requests that
had to wait for a connection; the sampler reports the pool and the audit buffer."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from ricord_archive import audit_trail
from ricord_archive.index.audit_rows import AuditRows, AuditWriter
from ricord_archive.index.database import create_pool, ensure_database
from ricord_archive.index.embedded import EmbeddedPostgres
from ricord_archive.index.replica import Reads
from ricord_archive.runtime import metrics


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def url(tmp_path_factory) -> Iterator[str]:
    embedded = EmbeddedPostgres(tmp_path_factory.mktemp("pool") / "pg")
    url = embedded.start()
    asyncio.run(ensure_database(url))
    yield url
    embedded.stop()


def test_a_request_waits_only_when_every_connection_is_in_use(url):
    async def run() -> None:
        pool = await create_pool(url)
        try:
            before = _value("ricord_db_pool_waits_total")
            held = [await pool.acquire() for _ in range(pool.get_max_size())]
            assert _value("ricord_db_pool_waits_total") == before  # none waited
            waiting = asyncio.create_task(pool.fetchval("SELECT 1"))
            await asyncio.sleep(0)  # it runs until it waits for a connection
            assert not waiting.done()
            await pool.release(held.pop())
            assert await waiting == 1
            assert _value("ricord_db_pool_waits_total") == before + 1
            assert _value("ricord_db_pool_wait_duration_seconds_count") >= 1
            for connection in held:
                await pool.release(connection)
            assert await pool.fetchval("SELECT 1") == 1
            assert _value("ricord_db_pool_waits_total") == before + 1
        finally:
            await pool.close()

    asyncio.run(run())


def test_the_sampler_reports_the_pool_and_the_audit_buffer(url):
    event = audit_trail.audit_log_used(audit_trail.Actor("tester", "admin", None, None), {}, 0)

    async def run() -> None:
        pool = await create_pool(url)
        writer = AuditWriter(AuditRows(pool), capacity=2)  # not started: nothing leaves the buffer
        dropped_before = _value("ricord_audit_events_dropped_total")
        try:
            connection = await pool.acquire()
            for _ in range(5):
                writer.record(event)
            sampler = asyncio.create_task(metrics.sample(pool, Reads(pool), writer))
            await asyncio.sleep(0)  # one round, then it sleeps
            assert _value("ricord_db_pool_connections", state="in_use") == 1
            assert _value("ricord_db_pool_max_connections") == pool.get_max_size()
            assert _value("ricord_audit_events_buffered") == 2
            assert _value("ricord_audit_events_dropped_total") == dropped_before + 3
            assert _value("ricord_read_replica_in_use") == 0  # no replica configured
            sampler.cancel()
            await pool.release(connection)
        finally:
            await pool.close()

    asyncio.run(run())
