"""QIDO-RS latency on a large index: bulk-load synthetic rows, then time queries over HTTP.

    python bench/qido_million.py --instances 1000000 --concurrency 8 --requests 200
    python bench/qido_million.py --instances 5000000 --partitioned 16 --json part.json

Starts its own archive (embedded PostgreSQL, temporary data directory), loads the index
directly with COPY (realistic rows: 100 instances per series, 2 series per study, 2 studies per
patient, several sites), then for each query prints p50/p95 latency at the given concurrency and
whether PostgreSQL's plan for it uses an index (EXPLAIN). Prints figures; asserts nothing.

`--partitioned N` (towards 10^9 instances, issue #9) also copies the instance rows into a
bench-only schema, `bench_part`, beside the archive's own (not a migration: the archive never
sees it), where `instance` is declaratively partitioned by hash of study_pk into N partitions
with the same indexes (the unique ones extended with study_pk, as PostgreSQL requires of a
partitioned table). The server cannot be pointed at that schema, so both schemas are then timed
in the same way without HTTP: the archive's own search code (`ricord_archive.index.search
.search`, i.e. the exact SQL of `index.query_sql.page_sql` and the count past the page) on an
asyncpg pool of `--concurrency` connections whose search_path is the schema. Also prints heap,
TOAST and index bytes per row of every table (pg_relation_size, pg_indexes_size, summed over
partitions).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import asyncpg
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ricord_archive.index.query_sql import page_sql
from ricord_archive.index.search import search
from ricord_archive.search.model import Level
from ricord_archive.search.qido import parse_qido

SERIES_PER_STUDY = 2
INSTANCES_PER_SERIES = 100
STUDIES_PER_PATIENT = 2
SITES = 8


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _uid(kind: int, number: int) -> str:
    return f"2.25.{kind}{number:012d}"


def _pn(value: str) -> dict:
    return {"vr": "PN", "Value": [{"Alphabetic": value}]}


def _text(vr: str, value: object) -> dict:
    return {"vr": vr, "Value": [value]}


async def load(url: str, instances: int) -> dict:
    """Fill the index with synthetic rows; return a few values to query for."""
    rng = random.Random(1234)
    series_count = instances // INSTANCES_PER_SERIES
    study_count = max(1, series_count // SERIES_PER_STUDY)
    patient_count = max(1, study_count // STUDIES_PER_PATIENT)
    conn = await asyncpg.connect(url)
    try:
        sites = [await conn.fetchval(
            "INSERT INTO site (name, siteid) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE "
            "SET name = excluded.name RETURNING id", f"bench-{n}", str(200000 + n),
        ) for n in range(SITES)]
        base_patient = await conn.fetchval("SELECT coalesce(max(pk), 0) FROM patient")
        patients = []
        for n in range(patient_count):
            site = n % SITES
            patients.append((base_patient + n + 1, sites[site], os.urandom(32),
                             f"{200000 + site}-{n:06d}", -(1 + rng.randrange(3650))))
        await conn.copy_records_to_table(
            "patient", records=patients,
            columns=["pk", "site_id", "patient_key", "pseudonym", "date_offset_days"])
        studies, series_rows, instance_rows, tally_rows = [], [], [], []
        base_study = await conn.fetchval("SELECT coalesce(max(pk), 0) FROM study")
        base_series = await conn.fetchval("SELECT coalesce(max(pk), 0) FROM series")
        base_instance = await conn.fetchval("SELECT coalesce(max(pk), 0) FROM instance")
        start = dt.date(2015, 1, 1)
        for s in range(study_count):
            patient = patients[s % patient_count]
            date = start + dt.timedelta(days=rng.randrange(3000))
            modality = rng.choice(["CT", "CT", "CR", "DX", "MR"])
            study_uid = _uid(1, base_study + s)
            study_json = orjson.dumps({
                "00080020": _text("DA", date.strftime("%Y%m%d")),
                "00080030": _text("TM", "101500"),
                "00080050": _text("SH", f"A{s:015d}"),
                "00100010": _pn(patient[3]), "00100020": _text("LO", patient[3]),
                "00100040": _text("CS", "F"), "0020000D": _text("UI", study_uid),
                "00120030": _text("LO", patient[3][:6]), "00120062": _text("CS", "YES"),
            })
            studies.append((base_study + s + 1, patient[0], patient[1], study_uid, date,
                            dt.time(10, 15), f"A{s:015d}", f"S{s:07d}", "F", "064Y",
                            [modality], study_json))
            for k in range(SERIES_PER_STUDY):
                se = s * SERIES_PER_STUDY + k
                series_uid = _uid(2, base_series + se)
                series_json = orjson.dumps({
                    "00080060": _text("CS", modality), "0020000E": _text("UI", series_uid),
                    "00200011": _text("IS", k + 1),
                })
                series_rows.append((base_series + se + 1, base_study + s + 1, series_uid,
                                    modality, k + 1, series_json))
                tally_rows.append((base_series + se + 1, 0, base_study + s + 1, patient[0],
                                   INSTANCES_PER_SERIES))
                for i in range(INSTANCES_PER_SERIES):
                    number = se * INSTANCES_PER_SERIES + i
                    sop_uid = _uid(3, base_instance + number)
                    instance_rows.append((
                        base_instance + number + 1, base_series + se + 1, base_study + s + 1,
                        sop_uid, "1.2.840.10008.5.1.4.1.1.2", i + 1, "1.2.840.10008.1.2.1",
                        f"{number:032x}"[-32:], 527000, os.urandom(32),
                        orjson.dumps({"00080016": _text("UI", "1.2.840.10008.5.1.4.1.1.2"),
                                      "00080018": _text("UI", sop_uid),
                                      "00200013": _text("IS", i + 1),
                                      "00280010": _text("US", 512),
                                      "00280011": _text("US", 512)}),
                    ))
            if len(instance_rows) >= 200_000 or s == study_count - 1:
                await conn.copy_records_to_table(
                    "study", records=studies,
                    columns=["pk", "patient_pk", "site_id", "study_uid", "study_date",
                             "study_time", "accession_number", "study_id", "patient_sex",
                             "patient_age", "modalities", "dicom_json"])
                await conn.copy_records_to_table(
                    "series", records=series_rows,
                    columns=["pk", "study_pk", "series_uid", "modality", "series_number",
                             "dicom_json"])
                await conn.copy_records_to_table(
                    "instance_tally", records=tally_rows,
                    columns=["series_pk", "slot", "study_pk", "patient_pk", "instances"])
                await conn.copy_records_to_table(
                    "instance", records=instance_rows,
                    columns=["pk", "series_pk", "study_pk", "sop_uid", "sop_class_uid",
                             "instance_number", "transfer_syntax_uid", "blob_key",
                             "size_bytes", "sha256", "dicom_json"])
                print(f"  loaded {(s + 1) * SERIES_PER_STUDY * INSTANCES_PER_SERIES:,} ...",
                      file=sys.stderr, end="\r")
                studies, series_rows, instance_rows, tally_rows = [], [], [], []
        for table in ("patient", "study", "series", "instance"):
            await conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'pk'), "
                f"(SELECT max(pk) FROM {table}))"
            )
        await conn.execute("ANALYZE")
        middle = await conn.fetchrow(
            "SELECT st.study_uid, st.study_date, p.pseudonym, se.series_uid, site.siteid "
            "FROM study st JOIN patient p ON p.pk = st.patient_pk "
            "JOIN site ON site.id = p.site_id JOIN series se ON se.study_pk = st.pk "
            "ORDER BY st.pk OFFSET $1 LIMIT 1", study_count // 2,
        )
        return dict(middle) | {"studies": study_count}
    finally:
        await conn.close()


def queries(sample: dict) -> dict[str, tuple[Level, str, dict]]:
    d = sample["study_date"]
    low, high = (d - dt.timedelta(days=7)).strftime("%Y%m%d"), d.strftime("%Y%m%d")
    return {
        "study by PatientID": (Level.STUDY, f"studies?PatientID={sample['pseudonym']}", {}),
        "study by PatientName prefix*": (
            Level.STUDY, f"studies?PatientName={sample['pseudonym'][:11]}*&limit=25", {}),
        "study by StudyDate range (1 week)": (
            Level.STUDY, f"studies?StudyDate={low}-{high}&limit=25", {}),
        "study by ModalitiesInStudy": (Level.STUDY, "studies?ModalitiesInStudy=MR&limit=25", {}),
        "study by SITEID": (
            Level.STUDY, f"studies?ClinicalTrialSiteID={sample['siteid']}&limit=25", {}),
        "studies deep page (offset = half)": (
            Level.STUDY, f"studies?limit=25&offset={sample['studies'] // 2}", {}),
        "a series' instances (100)": (
            Level.INSTANCE,
            f"studies/{sample['study_uid']}/series/{sample['series_uid']}/instances",
            {"StudyInstanceUID": sample["study_uid"],
             "SeriesInstanceUID": sample["series_uid"]}),
        "instances?limit=100": (Level.INSTANCE, "instances?limit=100", {}),
    }


def parsed(level: Level, path: str, scope: dict):
    params = [tuple(p.split("=", 1)) for p in path.partition("?")[2].split("&") if p]
    return parse_qido(level, params, 1000, scope)


PARTITION_NAME = re.compile(r"instance_p\d+")


async def explain(url: str, level: Level, path: str, scope: dict, schema: str = "public"
                  ) -> str:
    """Which index PostgreSQL's plan for the query uses ('-' when it scans a table); on the
    partitioned schema (EXPLAIN ANALYZE, run once) also how many instance partitions the
    execution touched (run-time pruning leaves the others 'never executed')."""
    sql, values = page_sql(parsed(level, path, scope))
    conn = await asyncpg.connect(url, server_settings={"search_path": f"{schema}, public"})
    analyze = "ANALYZE, " if schema != "public" else ""
    try:
        plan = json.loads(await conn.fetchval(f"EXPLAIN ({analyze}FORMAT JSON) {sql}", *values))
    finally:
        await conn.close()
    found, seq, touched, listed = set(), set(), set(), set()

    def walk(node: dict) -> None:
        relation = node.get("Relation Name", "")
        if PARTITION_NAME.fullmatch(relation):
            listed.add(relation)
            if node.get("Actual Loops", 1):
                touched.add(relation)
        if "Index Name" in node:
            found.add(PARTITION_NAME.sub("instance_pN", node["Index Name"]))
        if node.get("Node Type") == "Seq Scan":
            seq.add(PARTITION_NAME.sub("instance_pN", relation))
        for child in node.get("Plans", []):
            walk(child)

    walk(plan[0]["Plan"])
    text = ", ".join(sorted(found)) or "-"
    if seq:
        text += f" (seq scan: {', '.join(sorted(seq))})"
    if listed or schema != "public":
        text += f"; partitions touched {len(touched)}"
    return text


# ---------------------------------------------------------------- a partitioned instance table
INSTANCE_INDEXES = (   # the archive's indexes on instance, unique ones extended with study_pk
    "ALTER TABLE bench_part.instance ADD CONSTRAINT instance_pkey PRIMARY KEY (pk, study_pk)",
    "CREATE UNIQUE INDEX instance_sop_uid_key ON bench_part.instance (sop_uid, study_pk)",
    "CREATE UNIQUE INDEX instance_blob_key_key ON bench_part.instance (blob_key, study_pk)",
    "CREATE INDEX instance_by_series ON bench_part.instance (series_pk, instance_number)",
    "CREATE INDEX instance_by_study ON bench_part.instance (study_pk)",
    "CREATE INDEX instance_by_sop_class ON bench_part.instance (sop_class_uid)",
)


async def partition(url: str, partitions: int) -> dict[str, float]:
    """Copy public.instance into bench_part.instance, hash-partitioned by study_pk; seconds
    of each step."""
    conn = await asyncpg.connect(url)
    steps: dict[str, float] = {}
    try:
        await conn.execute("SET maintenance_work_mem = '512MB'")
        await conn.execute("DROP SCHEMA IF EXISTS bench_part CASCADE; CREATE SCHEMA bench_part")
        await conn.execute("CREATE TABLE bench_part.instance (LIKE public.instance "
                           "INCLUDING DEFAULTS) PARTITION BY HASH (study_pk)")
        for n in range(partitions):
            await conn.execute(f"CREATE TABLE bench_part.instance_p{n:03d} PARTITION OF "
                               f"bench_part.instance FOR VALUES WITH (MODULUS {partitions}, "
                               f"REMAINDER {n})")
        started = time.perf_counter()
        await conn.execute("INSERT INTO bench_part.instance SELECT * FROM public.instance")
        steps["copy_s"] = time.perf_counter() - started
        started = time.perf_counter()
        for statement in INSTANCE_INDEXES:
            await conn.execute(statement)
        steps["indexes_s"] = time.perf_counter() - started
        await conn.execute("ANALYZE bench_part.instance")
    finally:
        await conn.close()
    return steps


SIZES_SQL = """
SELECT count(*) AS parts, sum(pg_relation_size(relid)) AS heap,
       sum(pg_total_relation_size(relid) - pg_relation_size(relid) - pg_indexes_size(relid))
           AS toast,
       sum(pg_indexes_size(relid)) AS indexes
FROM (SELECT relid FROM pg_partition_tree($1::regclass) WHERE isleaf
      UNION SELECT $1::regclass WHERE pg_partition_root($1::regclass) IS NULL) AS t
"""
INDEX_SIZES_SQL = """
SELECT ix.indexrelid::regclass::text AS name,
       coalesce((SELECT sum(pg_relation_size(t.relid)) FROM pg_partition_tree(ix.indexrelid) t
                 WHERE t.isleaf), pg_relation_size(ix.indexrelid)) AS bytes
FROM pg_index ix WHERE ix.indrelid = $1::regclass ORDER BY 2 DESC
"""


async def sizes(url: str, partitioned: bool) -> list[dict]:
    """Bytes (heap, TOAST and the rest, indexes) and bytes per row of each table, and of each
    index of the instance tables."""
    tables = ["public.patient", "public.study", "public.series", "public.instance"]
    if partitioned:
        tables.append("bench_part.instance")
    conn = await asyncpg.connect(url)
    found = []
    try:
        for table in tables:
            rows = await conn.fetchval(f"SELECT count(*) FROM {table}")
            row = dict(await conn.fetchrow(SIZES_SQL, table))
            entry = {"table": table, "rows": rows, "partitions": row["parts"],
                     "heap": int(row["heap"]), "toast": int(row["toast"]),
                     "indexes": int(row["indexes"])}
            if table.endswith("instance"):
                entry["each_index"] = {
                    r["name"].split(".")[-1]: int(r["bytes"] or 0)
                    for r in await conn.fetch(INDEX_SIZES_SQL, table)}
            found.append(entry)
    finally:
        await conn.close()
    return found


async def measure_sql(url: str, schema: str, level: Level, path: str, scope: dict,
                      concurrency: int, requests: int) -> list[float]:
    """The archive's search (page and count past it) on `concurrency` connections whose
    search_path is `schema`; latency of each in ms, after one warm-up."""
    query = parsed(level, path, scope)
    latencies: list[float] = []
    async with asyncpg.create_pool(
        url, min_size=concurrency, max_size=concurrency,
        server_settings={"search_path": f"{schema}, public"},
    ) as pool:
        await search(pool, query)

        async def worker(count: int) -> None:
            for _ in range(count):
                started = time.perf_counter()
                await search(pool, query)
                latencies.append((time.perf_counter() - started) * 1000)

        per = max(1, requests // concurrency)
        await asyncio.gather(*(worker(per) for _ in range(concurrency)))
    return latencies


async def measure(base: str, path: str, concurrency: int, requests: int) -> list[float]:
    latencies: list[float] = []
    async with aiohttp.ClientSession() as session:
        async def worker(count: int) -> None:
            for _ in range(count):
                started = time.perf_counter()
                async with session.get(f"{base}/{path}") as response:
                    await response.read()
                    assert response.status == 200, response.status
                latencies.append((time.perf_counter() - started) * 1000)

        async with session.get(f"{base}/{path}") as warm:
            await warm.read()
        per = max(1, requests // concurrency)
        await asyncio.gather(*(worker(per) for _ in range(concurrency)))
    return latencies


def print_rows(rows: list[dict], partitioned: bool, partitions: int) -> None:
    if not partitioned:
        print(f"| {'query':<36} | p50 ms | p95 ms | index used |")
        print(f"|{'-' * 38}|--------|--------|------------|")
        for row in rows:
            print(f"| {row['query']:<36} | {row['p50_ms']:>6} | {row['p95_ms']:>6} | "
                  f"{row['index']} |")
        return
    print("| query | HTTP p50 / p95 ms | SQL p50 / p95 ms | SQL, instance in "
          f"{partitions} partitions, p50 / p95 ms | index used (partitioned) |")
    print("|---|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['query']} | {row['p50_ms']} / {row['p95_ms']} | {row['sql_p50_ms']} / "
              f"{row['sql_p95_ms']} | {row['part_p50_ms']} / {row['part_p95_ms']} | "
              f"{row['part_index']} |")


def print_sizes(tables: list[dict]) -> None:
    print("\n| table | rows | partitions | heap MB | TOAST MB | indexes MB | heap B/row "
          "| TOAST B/row | index B/row |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in tables:
        n = max(1, t["rows"])
        print(f"| {t['table']} | {t['rows']:,} | {t['partitions']} | {t['heap'] / 1e6:,.0f} | "
              f"{t['toast'] / 1e6:,.0f} | {t['indexes'] / 1e6:,.0f} | {t['heap'] / n:.0f} | "
              f"{t['toast'] / n:.0f} | {t['indexes'] / n:.0f} |")
    for t in tables:
        if "each_index" in t:
            n = max(1, t["rows"])
            print(f"\n{t['table']} indexes, bytes per row: " + ", ".join(
                f"{name} {size / n:.0f}" for name, size in t["each_index"].items()))


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--partitioned", type=int, default=0, metavar="N",
                        help="also time the queries on a bench-only copy of the instance "
                             "table hash-partitioned by study into N partitions (SQL timing)")
    args = parser.parse_args()
    loadavg_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ricord-bench-") as tmp:
        http_port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RICORD_")}
        server = subprocess.Popen(
            [sys.executable, "-m", "ricord_archive", "serve", "--data-dir", f"{tmp}/data",
             "--http-port", str(http_port), "--dimse-port", str(_free_port())],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )
        try:
            base = f"http://127.0.0.1:{http_port}/dicom-web"
            for _ in range(600):
                try:
                    async with aiohttp.ClientSession() as s, s.get(
                        f"http://127.0.0.1:{http_port}/health"
                    ) as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            url = subprocess.run(
                [sys.executable, "-m", "ricord_archive", "db-url", "--data-dir", f"{tmp}/data"],
                capture_output=True, text=True, check=True, env=env,
            ).stdout.strip()
            started = time.perf_counter()
            sample = await load(url, args.instances)
            load_s = time.perf_counter() - started
            print(f"loaded {args.instances:,} instances in {load_s:.0f} s", file=sys.stderr)
            steps = {}
            if args.partitioned:
                steps = await partition(url, args.partitioned)
                print(f"partitioned copy: {steps}", file=sys.stderr)
            rows = []
            for name, (level, path, scope) in queries(sample).items():
                latencies = await measure(base, path, args.concurrency, args.requests)
                plan = await explain(url, level, path, scope)
                row = {"query": name, "p50_ms": round(percentile(latencies, 50), 2),
                       "p95_ms": round(percentile(latencies, 95), 2), "index": plan}
                if args.partitioned:
                    for schema, key in (("public", "sql"), ("bench_part", "part")):
                        ms = await measure_sql(url, schema, level, path, scope,
                                               args.concurrency, args.requests)
                        row[f"{key}_p50_ms"] = round(percentile(ms, 50), 2)
                        row[f"{key}_p95_ms"] = round(percentile(ms, 95), 2)
                    row["part_index"] = await explain(url, level, path, scope, "bench_part")
                print(f"  {row}", file=sys.stderr)
                rows.append(row)
            tables = await sizes(url, bool(args.partitioned))
            loadavg_after = os.getloadavg()
            print(f"\nQIDO-RS on {args.instances:,} instances, concurrency {args.concurrency}, "
                  f"{args.requests} requests each (nproc {os.cpu_count()}; load average before "
                  f"{', '.join(f'{x:.2f}' for x in loadavg_before)}, after "
                  f"{', '.join(f'{x:.2f}' for x in loadavg_after)}; loaded in {load_s:.0f} s)\n")
            print_rows(rows, bool(args.partitioned), args.partitioned)
            print_sizes(tables)
            if args.json:
                args.json.write_text(json.dumps(
                    {"date": dt.date.today().isoformat(), "instances": args.instances,
                     "concurrency": args.concurrency, "requests": args.requests,
                     "partitions": args.partitioned, "load_s": round(load_s, 1), **steps,
                     "loadavg_before": loadavg_before, "loadavg_after": loadavg_after,
                     "rows": rows, "sizes": tables}, indent=2))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)


if __name__ == "__main__":
    asyncio.run(main())
