"""The index transaction of one stored instance, alone: `store_instance` of
`ricord_archive.index.store`, timed against a migrated embedded PostgreSQL.

    python bench/index_store.py                       # 2000 instances, 1 and 4 senders
    python bench/index_store.py --instances 4000 --per-study 400 --blob-ms 0 1

Starts its own embedded PostgreSQL in a temporary directory (synchronous_commit on, as the
archive runs it), migrates it with the archive's migrations and calls the archive's own
`store_instance` N times: a new study every `--per-study` instances (2 series each, realistic
DICOM JSON sizes), by one sender, then by 4 concurrent senders of the same studies (each takes
the next instance, as associations sending one study in parallel do). `--blob-ms` simulates
the durable blob write the transaction waits for before it commits (0: already written).
Prints ms per instance (wall time / N), the p50/p95 of one call, WAL bytes per instance, and
the CPU time per instance of PostgreSQL (all its processes, from /proc) and of this client:
on a shared machine the CPU figures move less than the wall times. Prints figures; asserts
nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ricord_archive.config import SiteConfig
from ricord_archive.deid import PatientKeys
from ricord_archive.dicom.io import PixelDataLocation
from ricord_archive.dicom.json import InstanceRecord
from ricord_archive.index.database import create_pool, ensure_database
from ricord_archive.index.embedded import EmbeddedPostgres
from ricord_archive.index.migrate import migrate
from ricord_archive.index.store import NewInstance, ensure_site, patient_for, store_instance

SERIES_PER_STUDY = 2
CT = "1.2.840.10008.5.1.4.1.1.2"


def _text(vr: str, *values: object) -> dict:
    return {"vr": vr, "Value": list(values)}


def study_json(uid: str) -> bytes:
    return orjson.dumps({
        "00080020": _text("DA", "20210203"), "00080030": _text("TM", "101500"),
        "00080050": _text("SH", "A000000000001"), "00081030": _text("LO", "CT CHEST " * 4),
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "123456-000001"}]},
        "00100020": _text("LO", "123456-000001"), "00100030": _text("DA", "19600101"),
        "00100040": _text("CS", "F"), "00101010": _text("AS", "061Y"),
        "0020000D": _text("UI", uid), "00200010": _text("SH", "S0000001"),
        "00120062": _text("CS", "YES"), "00120063": _text("LO", "DICOM PS3.15 E.1-1", "113100"),
        "00120030": _text("LO", "123456"), "00120031": _text("LO", "RICORD bench site"),
    })


def series_json(uid: str, number: int) -> bytes:
    return orjson.dumps({
        "00080060": _text("CS", "CT"), "0008103E": _text("LO", "AXIAL 1.25MM " * 3),
        "0020000E": _text("UI", uid), "00200011": _text("IS", number),
        "00400244": _text("DA", "20210203"), "00400245": _text("TM", "101700"),
        "00180015": _text("CS", "CHEST"), "00185100": _text("CS", "HFS"),
    })


def instance_json(uid: str, number: int) -> bytes:
    document = {
        "00080016": _text("UI", CT), "00080018": _text("UI", uid),
        "00080008": _text("CS", "ORIGINAL", "PRIMARY", "AXIAL"),
        "00200013": _text("IS", number), "00200032": _text("DS", -250.0, -250.0, -number * 1.25),
        "00200037": _text("DS", 1, 0, 0, 0, 1, 0), "00280010": _text("US", 512),
        "00280011": _text("US", 512), "00280030": _text("DS", 0.976, 0.976),
        "00281050": _text("DS", 40), "00281051": _text("DS", 400),
        "00281052": _text("DS", -1024), "00281053": _text("DS", 1),
    }
    for element in range(0x1000, 0x1040):  # the other CT attributes, a few KB in all
        document[f"0018{element:04X}"] = _text("DS", element * 0.5, element)
    return orjson.dumps(document)


def new_instance(run: str, number: int, per_study: int) -> NewInstance:
    study, slice_number = divmod(number, per_study)
    series = study * SERIES_PER_STUDY + slice_number * SERIES_PER_STUDY // per_study
    study_uid = f"1.2.826.0.1.3680043.10.999.{run}.1.{study}"
    series_uid = f"1.2.826.0.1.3680043.10.999.{run}.2.{series}"
    sop_uid = f"1.2.826.0.1.3680043.10.999.{run}.3.{number}"
    record = InstanceRecord(
        study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid, sop_class_uid=CT,
        modality="CT", study_date=dt.date(2021, 2, 3), study_time=dt.time(10, 15),
        accession_number="A000000000001", study_id="S0000001", patient_sex="F",
        patient_age="061Y", series_number=series % SERIES_PER_STUDY + 1,
        pps_start_date=dt.date(2021, 2, 3), pps_start_time=dt.time(10, 17),
        instance_number=slice_number + 1, number_of_frames=1, rows=512, columns=512,
        samples_per_pixel=1, bits_allocated=16,
    )
    return NewInstance(
        record, "1.2.840.10008.1.2.1", os.urandom(16).hex(), 527_000, os.urandom(32),
        PixelDataLocation(6_000, 524_288), study_json(study_uid),
        series_json(series_uid, record.series_number), instance_json(sop_uid, slice_number),
    )


async def blob_write(blob_ms: float) -> None:
    if blob_ms:
        await asyncio.sleep(blob_ms / 1000)


def server_cpu(pgdata: Path) -> float:
    """CPU seconds used so far by the postmaster and its children (Linux /proc)."""
    postmaster = int((pgdata / "postmaster.pid").read_text().split()[0])
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # gone meanwhile
        pid, fields = int(stat.parent.name), text[text.rindex(")") + 2:].split()
        if pid == postmaster or int(fields[1]) == postmaster:
            total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


async def run(pool: asyncpg.Pool, site, patient, instances: list[NewInstance], senders: int,
              blob_ms: float) -> tuple[float, list[float], int]:
    """Store every instance with `senders` concurrent senders; (wall s, call times, WAL)."""
    queue = iter(instances)
    calls: list[float] = []

    async def sender() -> None:
        for new in queue:
            start = time.perf_counter()
            row = await store_instance(pool, site, patient, new, "keep-first",
                                       blob_write(blob_ms))
            calls.append(time.perf_counter() - start)
            assert row.outcome == "inserted", row

    wal_before = await pool.fetchval("SELECT pg_current_wal_lsn()")
    start = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(senders)))
    wall = time.perf_counter() - start
    wal = await pool.fetchval("SELECT pg_current_wal_lsn() - $1::pg_lsn", wal_before)
    return wall, calls, int(wal)


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="index-store-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        embedded = EmbeddedPostgres(root / "pg")
        url = await asyncio.to_thread(embedded.start)
        try:
            await ensure_database(url)
            pool = await create_pool(url)
            try:
                async with pool.acquire() as conn:
                    await migrate(conn)
                    site = await ensure_site(conn, SiteConfig("bench"))
                    print("synchronous_commit", await conn.fetchval("SHOW synchronous_commit"),
                          "| fsync", await conn.fetchval("SHOW fsync"))
                patient = (await patient_for(pool, site, PatientKeys(os.urandom(32), None))
                           ).patient
                warm = [new_instance("9", n, args.per_study) for n in range(200)]
                await run(pool, site, patient, warm, 1, 0)
                print(f"{'senders':>7} {'blob ms':>7} {'ms/inst':>8} {'p50 ms':>7} "
                      f"{'p95 ms':>7} {'WAL B/inst':>10} {'PG CPU us':>9} {'py CPU us':>9}")
                tag = 10
                for blob_ms in args.blob_ms:
                    for senders in args.senders:
                        tag += 1
                        batch = [new_instance(str(tag), n, args.per_study)
                                 for n in range(args.instances)]
                        cpu = server_cpu(embedded.pgdata), time.process_time()
                        wall, calls, wal = await run(pool, site, patient, batch, senders,
                                                     blob_ms)
                        pg_cpu = server_cpu(embedded.pgdata) - cpu[0]
                        py_cpu = time.process_time() - cpu[1]
                        calls.sort()
                        print(f"{senders:>7} {blob_ms:>7g} {wall * 1000 / len(batch):>8.3f} "
                              f"{statistics.median(calls) * 1000:>7.3f} "
                              f"{calls[int(len(calls) * 0.95)] * 1000:>7.3f} "
                              f"{wal / len(batch):>10.0f} {pg_cpu * 1e6 / len(batch):>9.0f} "
                              f"{py_cpu * 1e6 / len(batch):>9.0f}")
            finally:
                await pool.close()
        finally:
            await asyncio.to_thread(embedded.stop)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--per-study", type=int, default=200)
    parser.add_argument("--senders", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--blob-ms", type=float, nargs="+", default=[0.0, 1.0])
    asyncio.run(main(parser.parse_args()))
