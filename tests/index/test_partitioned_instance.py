"""The instance table partitioned by study (migrations/014) on the embedded PostgreSQL: an
existing index converted with every row kept, the partition count, SOP Instance UIDs unique
across partitions, concurrent writers of one UID, and retrievals that plan one partition."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import asyncpg
import orjson
import pytest

from ricord_archive.errors import RefusedObject
from ricord_archive.index import reads
from ricord_archive.index.cohorts import CohortRows
from ricord_archive.index.migrate import (
    check_partitions,
    instance_partitions,
    load_migrations,
    migrate,
)
from ricord_archive.index.store import _ARGUMENTS, _STORE, _StoreCall, store_instance
from ricord_archive.search.model import Level
from tests.conftest import fresh_database
from tests.index import test_index_store
from tests.index.test_index_store import Index, _written, instance

index = test_index_store.index  # the fixture: a freshly migrated database per scenario

EVERYTHING = load_migrations()
BEFORE = [m for m in EVERYTHING if m.version < 14]


async def _study_partition(ix: Index, study: int) -> str:
    """The partition holding the instances of test study `study`."""
    return await ix.pool.fetchval(
        "SELECT DISTINCT i.tableoid::regclass::text FROM instance i JOIN study st "
        "ON st.pk = i.study_pk WHERE st.study_uid = $1", instance(study, 0, 0).record.study_uid)


def test_conversion_keeps_every_row_and_the_pk_sequence(index):
    async def scenario(ix: Index) -> None:
        patient = await ix.patient(b"p" * 32)
        places = [(1, 1)] * 3 + [(2, 2)] * 2 + [(3, 3), (3, 4), (4, 5)]  # (study, series)
        for number, (study, series) in enumerate(places):  # as migrations/009 stores them
            assert (await ix.store(patient, instance(study, series, number))).outcome \
                == "inserted"
        cohort = await ix.pool.fetchval(  # a frozen cohort, as migrations/011 holds it
            "INSERT INTO cohort (name, num_studies, num_series, num_instances, size_bytes, "
            "metadata_csv, clinical_csv) VALUES ('c', 2, 2, 5, 500, '', '') RETURNING id")
        await ix.pool.execute(
            "INSERT INTO cohort_instance (cohort_id, position, instance_pk, blob_key, "
            "size_bytes, sha256, crc32) SELECT $1, row_number() OVER (ORDER BY pk), pk, "
            "blob_key, size_bytes, sha256, 7 FROM instance WHERE series_pk IN "
            "(SELECT pk FROM series WHERE series_uid = ANY($2::text[]))",
            cohort, [instance(0, s, 0).record.series_uid for s in (1, 2)])
        changed = replace(instance(2, 2, 3, content=b"new"), blob_key="new-blob")
        assert (await ix.store(patient, changed, "overwrite")).outcome == "replaced"
        before = {
            table: [dict(r) for r in await ix.pool.fetch(f"SELECT * FROM {table} ORDER BY 1, 2")]
            for table in ("instance", "instance_tally", "cohort_instance")
        }
        assert len(before["instance"]) == len(places)

        async with ix.pool.acquire() as conn:
            await migrate(conn, EVERYTHING)
        await ix.pool.expire_connections()  # plans of the old function and table

        async with ix.pool.acquire() as conn:
            assert await instance_partitions(conn) == 128
        after = [dict(r) for r in await ix.pool.fetch("SELECT * FROM instance ORDER BY 1, 2")]
        assert after == before["instance"]
        assert before["instance_tally"] == [dict(r) for r in await ix.pool.fetch(
            "SELECT * FROM instance_tally ORDER BY 1, 2")]
        frozen = [dict(r) for r in await ix.pool.fetch(
            "SELECT * FROM cohort_instance ORDER BY 1, 2")]
        by_pk = {r["pk"]: r for r in after}
        assert frozen == [{**r, "study_pk": by_pk[r["instance_pk"]]["study_pk"]}
                          for r in before["cohort_instance"]]
        assert sorted(tuple(r) for r in await ix.pool.fetch(
            "SELECT sop_uid, study_pk, instance_pk FROM instance_uid")) == sorted(
            (r["sop_uid"], r["study_pk"], r["pk"]) for r in after)
        files = await CohortRows(ix.pool).cohort_files(cohort)
        assert [f.instance_pk for f in files] == [r["instance_pk"] for r in frozen]
        assert await CohortRows(ix.pool).replaced_files(cohort) == 1

        assert (await ix.store(patient, instance(4, 5, 99))).outcome == "inserted"
        new_pk = await ix.pool.fetchval("SELECT instance_pk FROM instance_uid WHERE sop_uid = $1",
                                        instance(4, 5, 99).record.sop_uid)
        assert new_pk > max(by_pk)
        assert sorted(await ix.counts(Level.STUDY)) == [(1, 2), (1, 2), (1, 3), (2, 2)]

    index(scenario, BEFORE)


@pytest.mark.parametrize("configured", [None, 5])
def test_a_new_index_has_the_configured_number_of_partitions(cluster, configured, caplog):
    async def go() -> None:
        url = await fresh_database(cluster, f"partitions-{configured}")
        conn = await asyncpg.connect(url)
        try:
            await migrate(conn, instance_partitions=configured)
            names = [r[0] for r in await conn.fetch(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'instance'::regclass ORDER BY 1")]
            count = configured or 128
            assert names == [f"instance_p{n:03d}" for n in range(count)]
            assert await instance_partitions(conn) == count
            with caplog.at_level(logging.WARNING, logger="ricord_archive.index.migrate"):
                await check_partitions(conn, count)
                assert not caplog.records
                assert await migrate(conn, instance_partitions=64) == 0
                await check_partitions(conn, 64)
            [warning] = caplog.records
            assert f"created with {count} instance partitions" in warning.getMessage()
        finally:
            await conn.close()

    asyncio.run(go())


def test_a_partition_count_out_of_range_is_refused(cluster):
    async def go() -> None:
        conn = await asyncpg.connect(await fresh_database(cluster, "partitions-0"))
        try:
            with pytest.raises(asyncpg.RaiseError, match="from 1 to 1024"):
                await migrate(conn, instance_partitions=0)
        finally:
            await conn.close()

    asyncio.run(go())


def test_a_sop_instance_uid_stays_unique_across_partitions(index):
    async def scenario(ix: Index) -> None:
        patient = await ix.patient(b"p" * 32)
        first = instance(1, 1, 1)
        assert (await ix.store(patient, first)).outcome == "inserted"
        home = await _study_partition(ix, 1)
        other = 2  # the first later study whose instances land in another partition
        while True:
            assert (await ix.store(patient, instance(other, other, 100 + other))).outcome \
                == "inserted"
            if await _study_partition(ix, other) != home:
                break
            other += 1
        moved = replace(first, record=replace(instance(other, other, 1).record,
                                              sop_uid=first.record.sop_uid))
        with pytest.raises(RefusedObject, match="SOP Instance UID already stored under another") \
                as refused:
            await ix.store(patient, moved)
        assert refused.value.reason == "relational-mismatch"
        assert await ix.pool.fetchval("SELECT count(*) FROM instance WHERE sop_uid = $1",
                                      first.record.sop_uid) == 1

        changed = instance(1, 1, 1, content=b"other")
        changed = replace(changed, blob_key="replacement")
        assert (await ix.store(patient, first)).outcome == "duplicate"
        assert (await ix.store(patient, changed)).outcome == "duplicate"
        replaced = await ix.store(patient, changed, "overwrite")
        assert (replaced.outcome, replaced.replaced_blob_key) == ("replaced", first.blob_key)
        row = await ix.pool.fetchrow(
            "SELECT i.tableoid::regclass::text AS partition, i.blob_key, i.sha256, "
            "u.instance_pk = i.pk AND u.study_pk = i.study_pk AS found "
            "FROM instance i JOIN instance_uid u ON u.sop_uid = i.sop_uid WHERE i.sop_uid = $1",
            first.record.sop_uid)
        assert tuple(row) == (home, "replacement", changed.sha256, True)
        assert (await ix.store(patient, changed, "overwrite")).outcome == "duplicate"
        assert sorted(await ix.counts(Level.STUDY))[-1] == (1, 1)

    index(scenario)


@pytest.mark.parametrize("isolation", ["read committed", "repeatable read"])
def test_concurrent_writers_of_one_sop_instance_uid(index, isolation):
    async def scenario(ix: Index) -> None:
        patient = await ix.patient(b"p" * 32)
        assert (await ix.store(patient, instance(1, 1, 1))).outcome == "inserted"  # study known
        first = instance(1, 1, 2)
        second = replace(first, blob_key="second-blob")
        async with ix.pool.acquire() as holder:
            async with holder.transaction():
                row = await holder.fetchrow(
                    _STORE, *_ARGUMENTS(_StoreCall(ix.site, patient, first, "keep-first")))
                assert row["outcome"] == "inserted"
                waiting = asyncio.create_task(
                    store_instance(ix.pool, ix.site, patient, second, "keep-first", _written()))
                await _until_waiting_on_a_lock(ix.pool, holder.get_server_pid())
            outcome = await asyncio.wait_for(waiting, 30)
        assert (outcome.outcome, outcome.sha256) == ("duplicate", first.sha256)
        rows = await ix.pool.fetch("SELECT blob_key FROM instance WHERE sop_uid = $1",
                                   first.record.sop_uid)
        assert [r["blob_key"] for r in rows] == [first.blob_key]
        assert await ix.counts(Level.STUDY) == [(1, 2)]

    index(scenario, isolation=isolation)


async def _until_waiting_on_a_lock(pool: asyncpg.Pool, holder_pid: int) -> None:
    """Return once a session other than `holder_pid` waits for a lock `holder_pid` holds."""
    deadline = asyncio.get_running_loop().time() + 30
    while not await pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity "
            "WHERE $1 = ANY (pg_blocking_pids(pid)))", holder_pid):
        assert asyncio.get_running_loop().time() < deadline, "the second writer never waited"
        await asyncio.sleep(0.01)


def _partition_scans(plan: object) -> list[str]:
    """The instance partitions an EXPLAIN (FORMAT JSON) plan reads."""
    if isinstance(plan, list):
        return [name for item in plan for name in _partition_scans(item)]
    if not isinstance(plan, dict):
        return []
    own = [plan["Relation Name"]] if str(plan.get("Relation Name", "")).startswith(
        "instance_p") else []
    return own + [name for value in plan.values() for name in _partition_scans(value)]


def test_a_retrieval_reads_its_study_s_partition_planned_once(index):
    async def scenario(ix: Index) -> None:
        patient = await ix.patient(b"p" * 32)
        for study in range(1, 7):
            for number in range(3):
                await ix.store(patient, instance(study, study, study * 10 + number))
        target = instance(4, 4, 41).record
        partition = await _study_partition(ix, 4)
        keys = reads.StudyKeys()
        found = await reads.stored_instances(ix.pool, target.study_uid, target.series_uid,
                                             target.sop_uid, keys=keys)
        assert [(f.sop_uid, f.study_uid) for f in found] == [(target.sop_uid, target.study_uid)]
        study_pk, home = keys.get(target.study_uid, None) or (0, "")
        assert home == partition
        async with ix.pool.acquire() as conn:
            # finding the partition itself reads (and locks) that partition only
            [plan] = orjson.loads(await conn.fetchval(
                "EXPLAIN (FORMAT JSON) " + reads._PARTITION, study_pk))
            assert _partition_scans(plan) == [partition]
            for depth, uids in ((1, ()), (2, (target.series_uid,)),
                                (3, (target.series_uid, target.sop_uid))):
                statement = reads.retrieval_statement(depth, table=home)
                for _ in range(8):  # past the plan cache's first custom plans
                    await conn.fetch(statement, study_pk, *uids)
                [plan] = orjson.loads(await conn.fetchval(
                    "EXPLAIN (FORMAT JSON) " + statement, study_pk, *uids))
                assert _partition_scans(plan) == [partition], depth
            # planned once and cached: a generic plan, of this one partition
            plans = await conn.fetch(
                "SELECT generic_plans FROM pg_prepared_statements WHERE statement = ANY($1)",
                [reads.retrieval_statement(depth, table=home) for depth in (1, 2, 3)])
            assert len(plans) == 3 and all(r["generic_plans"] > 0 for r in plans)
        assert len(await reads.instance_metadata(ix.pool, target.study_uid, keys=keys)) == 3
        assert await reads.stored_instances(ix.pool, target.study_uid,
                                            site_id=ix.site.id + 1) == []

    index(scenario)


def test_a_remembered_study_pk_that_names_nothing_is_looked_up_again(index):
    async def scenario(ix: Index) -> None:
        patient = await ix.patient(b"p" * 32)
        for number in range(3):
            await ix.store(patient, instance(1, 1, 10 + number))
        target = instance(1, 1, 11).record
        keys = reads.StudyKeys()
        await reads.stored_instances(ix.pool, target.study_uid, keys=keys)
        pk, home = keys.get(target.study_uid, None) or (0, "")
        for stale in ((pk + 1000, home), (pk, "instance_p9999")):  # no such study, partition
            keys.remember(target.study_uid, None, stale)
            found = await reads.stored_instances(ix.pool, target.study_uid, keys=keys)
            assert sorted(f.sop_uid for f in found) == sorted(
                instance(1, 1, 10 + n).record.sop_uid for n in range(3))
            assert keys.get(target.study_uid, None) == (pk, home)
        one = await reads.stored_instances(ix.pool, target.study_uid, target.series_uid,
                                           target.sop_uid, keys=keys)
        assert [(f.study_uid, f.series_uid, f.sop_uid) for f in one] == [
            (target.study_uid, target.series_uid, target.sop_uid)]
        assert await reads.stored_instances(ix.pool, target.study_uid, "1.2.3.4",
                                            target.sop_uid, keys=keys) == []
        assert await reads.stored_instances(ix.pool, "1.2.3.5", keys=keys) == []
        assert keys.get("1.2.3.5", None) is None

    index(scenario)
