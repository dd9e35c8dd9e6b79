"""QIDO-RS latency on a large index: bulk-load synthetic rows, then time queries over HTTP.

    python bench/qido_million.py --instances 10000000 --json qido.json
    python bench/qido_million.py --instances 10000000 --per-series 1 --partitions 128

Starts its own archive (embedded PostgreSQL, temporary data directory, the archive's own
schema: `instance` hash-partitioned by study, `--partitions` of them or the archive's default),
loads the index directly with COPY (100 instances per series unless `--per-series`, 2 series
per study, 2 studies per patient, 8 sites sharing 99 % of the patients and a rare one holding
1 %, 1 study in 200 of modality PT), then for each query prints p50/p95 latency over HTTP at
the given concurrency, the indexes PostgreSQL's plans use and how many instance partitions
they read (EXPLAIN ANALYZE of the archive's own statements, as `index.search.search` runs
them: an instance search's studies resolved first, the page, the count past it). Also prints
heap, TOAST and index bytes per row of every table (summed over partitions). Prints figures;
asserts nothing.
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
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ricord_archive.errors import BadRequest, QueryTooBroad
from ricord_archive.index.query_sql import STUDY_CAP, page_sql, rest_count_sql, studies_sql
from ricord_archive.search.model import Level, Query
from ricord_archive.search.qido import parse_qido

SERIES_PER_STUDY = 2
STUDIES_PER_PATIENT = 2
SITES = 8  # sites 0-7 share the patients but for 1 in 100, at RARE_SITE
RARE_SITE = SITES
RARE_MODALITY = 0.005  # the share of studies of modality PT


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


async def load(url: str, instances: int, per_series: int) -> dict:
    """Fill the index with synthetic rows (`per_series` instances in each series); return a
    few values to query for."""
    rng = random.Random(1234)
    series_count = instances // per_series
    study_count = max(1, series_count // SERIES_PER_STUDY)
    patient_count = max(1, study_count // STUDIES_PER_PATIENT)
    conn = await asyncpg.connect(url)
    try:
        sites = [await conn.fetchval(
            "INSERT INTO site (name, siteid) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE "
            "SET name = excluded.name RETURNING id", f"bench-{n}", str(200000 + n),
        ) for n in range(SITES + 1)]
        base_patient = await conn.fetchval("SELECT coalesce(max(pk), 0) FROM patient")
        patients = []
        for n in range(patient_count):
            site = RARE_SITE if n % 100 == 99 else n % SITES
            patients.append((base_patient + n + 1, sites[site], os.urandom(32),
                             f"{200000 + site}-{n:06d}", -(1 + rng.randrange(3650))))
        await conn.copy_records_to_table(
            "patient", records=patients,
            columns=["pk", "site_id", "patient_key", "pseudonym", "date_offset_days"])
        studies, series_rows, instance_rows, uid_rows, tally_rows = [], [], [], [], []
        base_study = await conn.fetchval("SELECT coalesce(max(pk), 0) FROM study")
        base_series = await conn.fetchval("SELECT coalesce(max(pk), 0) FROM series")
        base_instance = await conn.fetchval("SELECT coalesce(max(pk), 0) FROM instance")
        start = dt.date(2015, 1, 1)
        for s in range(study_count):
            patient = patients[s % patient_count]
            date = start + dt.timedelta(days=rng.randrange(3000))
            modality = "PT" if rng.random() < RARE_MODALITY else rng.choice(
                ["CT", "CT", "CR", "DX", "MR"])
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
                                   per_series))
                for i in range(per_series):
                    number = se * per_series + i
                    sop_uid = _uid(3, base_instance + number)
                    uid_rows.append((sop_uid, base_study + s + 1, base_instance + number + 1))
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
                await conn.copy_records_to_table(
                    "instance_uid", records=uid_rows,
                    columns=["sop_uid", "study_pk", "instance_pk"])
                print(f"  loaded {(s + 1) * SERIES_PER_STUDY * per_series:,} ...",
                      file=sys.stderr, end="\r")
                studies, series_rows, instance_rows, uid_rows, tally_rows = [], [], [], [], []
        for table in ("patient", "study", "series", "instance"):
            await conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'pk'), "
                f"(SELECT max(pk) FROM {table}))"
            )
        await conn.execute("ANALYZE")
        middle = await conn.fetchrow(
            "SELECT st.pk, st.study_uid, st.study_date, p.pseudonym, se.series_uid, "
            "site.siteid FROM study st JOIN patient p ON p.pk = st.patient_pk "
            "JOIN site ON site.id = p.site_id JOIN series se ON se.study_pk = st.pk "
            "WHERE p.site_id <> $2 ORDER BY st.pk OFFSET $1 LIMIT 1", study_count // 2,
            sites[RARE_SITE],
        )
        sop_uid = await conn.fetchval(
            "SELECT sop_uid FROM instance WHERE study_pk = $1 LIMIT 1", middle["pk"])
        return dict(middle) | {"sop_uid": sop_uid, "studies": study_count,
                               "rare_siteid": str(200000 + RARE_SITE)}
    finally:
        await conn.close()


def queries(sample: dict) -> dict[str, tuple[Level, str, dict, int]]:
    """Each query: its level, its QIDO-RS path, its scope (the UIDs of its path) and the HTTP
    status the archive answers it with."""
    d = sample["study_date"]
    low, high = (d - dt.timedelta(days=7)).strftime("%Y%m%d"), d.strftime("%Y%m%d")
    study, series = sample["study_uid"], sample["series_uid"]
    return {
        "study by PatientID": (Level.STUDY, f"studies?PatientID={sample['pseudonym']}", {}, 200),
        "study by PatientName prefix*": (
            Level.STUDY, f"studies?PatientName={sample['pseudonym'][:11]}*&limit=25", {}, 200),
        "study by StudyDate range (1 week)": (
            Level.STUDY, f"studies?StudyDate={low}-{high}&limit=25", {}, 200),
        "study by ModalitiesInStudy (MR, 1 in 5)": (
            Level.STUDY, "studies?ModalitiesInStudy=MR&limit=25", {}, 200),
        "study by ModalitiesInStudy (PT, 1 in 200)": (
            Level.STUDY, "studies?ModalitiesInStudy=PT&limit=25", {}, 200),
        "study by ModalitiesInStudy (CR or PT)": (
            Level.STUDY, "studies?ModalitiesInStudy=CR,PT&limit=25", {}, 200),
        "study by SITEID (1 in 8)": (
            Level.STUDY, f"studies?ClinicalTrialSiteID={sample['siteid']}&limit=25", {}, 200),
        "study by SITEID (1 in 100)": (
            Level.STUDY, f"studies?ClinicalTrialSiteID={sample['rare_siteid']}&limit=25", {},
            200),
        "studies deep page (offset = half)": (
            Level.STUDY, f"studies?limit=25&offset={sample['studies'] // 2}", {}, 200),
        "studies deep page (cursor at half)": (
            Level.STUDY, "studies?limit=25&cursor={cursor}", {}, 200),
        "series?limit=100": (Level.SERIES, "series?limit=100", {}, 200),
        "series by Modality (MR)": (Level.SERIES, "series?Modality=MR&limit=25", {}, 200),
        "a series' instances (per series)": (
            Level.INSTANCE, f"studies/{study}/series/{series}/instances",
            {"StudyInstanceUID": study, "SeriesInstanceUID": series}, 200),
        "a study's instances": (
            Level.INSTANCE, f"studies/{study}/instances", {"StudyInstanceUID": study}, 200),
        "instances by SOPInstanceUID": (
            Level.INSTANCE, f"instances?SOPInstanceUID={sample['sop_uid']}", {}, 200),
        "instances by PatientID": (
            Level.INSTANCE, f"instances?PatientID={sample['pseudonym']}&limit=100", {}, 200),
        "instances?limit=100 (refused)": (Level.INSTANCE, "instances?limit=100", {}, 400),
    }


def parsed(level: Level, path: str, scope: dict) -> Query:
    params = [tuple(p.split("=", 1)) for p in path.partition("?")[2].split("&") if p]
    return parse_qido(level, params, 1000, scope)


async def deep_cursor(base: str, offset: int) -> str:
    """The cursor of the page at `offset` (from the Link header of the page before it)."""
    async with aiohttp.ClientSession() as session, session.get(
        f"{base}/studies?limit=25&offset={offset - 25}"
    ) as response:
        await response.read()
        link = response.headers["Link"]
    return parse_qs(urlsplit(link[link.index("<") + 1:link.index(">")]).query)["cursor"][0]


PARTITION_NAME = re.compile(r"instance_p\d+")


async def statements(conn: asyncpg.Connection, query: Query) -> list[tuple[str, list]]:
    """The archive's statements for one page of `query` as `index.search.search` runs them:
    an instance search's studies resolved first, then the page and the count past it."""
    study_pks = None
    found: list[tuple[str, list]] = []
    if query.level is Level.INSTANCE:
        resolving = studies_sql(query)
        if resolving is None:
            raise QueryTooBroad("no studies named")
        found.append(resolving)
        sql, values = resolving
        study_pks = [r["pk"] for r in await conn.fetch(sql, *values)]
        if len(study_pks) > STUDY_CAP:
            raise QueryTooBroad("too many studies")
    page, values = page_sql(query, study_pks)
    found.append((page, values))
    rows = await conn.fetch(page, *values)
    if len(rows) > query.limit:
        found.append(rest_count_sql(query, rows[query.limit - 1]["page_key"], study_pks))
    return found


async def explain(url: str, level: Level, path: str, scope: dict) -> str:
    """The indexes PostgreSQL's plans for the query's statements use ('seq scan' when one reads
    a table whole) and how many instance partitions they read (EXPLAIN ANALYZE, custom plans
    as the archive runs them)."""
    try:
        query = parsed(level, path, scope)
    except BadRequest:
        return "refused (400)"
    conn = await asyncpg.connect(url)
    found, seq, touched = set(), set(), set()

    def walk(node: dict) -> None:
        relation = node.get("Relation Name", "")
        if PARTITION_NAME.fullmatch(relation) and node.get("Actual Loops", 1):
            touched.add(relation)
        if "Index Name" in node:
            found.add(PARTITION_NAME.sub("instance_pN", node["Index Name"]))
        if node.get("Node Type") == "Seq Scan":
            seq.add(PARTITION_NAME.sub("instance_pN", relation))
        for child in node.get("Plans", []):
            walk(child)

    try:
        await conn.execute("SET plan_cache_mode = force_custom_plan")
        try:
            run = await statements(conn, query)
        except QueryTooBroad:
            return "refused (400)"
        for sql, values in run:
            plan = json.loads(await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}",
                                                  *values))
            walk(plan[0]["Plan"])
    finally:
        await conn.close()
    text = ", ".join(sorted(found)) or "-"
    if seq:
        text += f" (seq scan: {', '.join(sorted(seq))})"
    if level is Level.INSTANCE:
        text += f"; instance partitions read {len(touched)}"
    return text


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
TABLES = ("patient", "study", "series", "study_modality", "instance", "instance_uid",
          "instance_tally")


async def sizes(url: str) -> list[dict]:
    """Bytes (heap, TOAST and the rest, indexes) and bytes per row of each table (summed over
    partitions), and of each index."""
    conn = await asyncpg.connect(url)
    found = []
    try:
        for table in TABLES:
            rows = await conn.fetchval(f"SELECT count(*) FROM {table}")
            row = dict(await conn.fetchrow(SIZES_SQL, table))
            found.append({
                "table": table, "rows": rows, "partitions": row["parts"],
                "heap": int(row["heap"]), "toast": int(row["toast"]),
                "indexes": int(row["indexes"]),
                "each_index": {r["name"]: int(r["bytes"] or 0)
                               for r in await conn.fetch(INDEX_SIZES_SQL, table)},
            })
    finally:
        await conn.close()
    return found


async def measure(base: str, path: str, status: int, concurrency: int, requests: int
                  ) -> list[float]:
    """Latency in ms of each of `requests` GETs of `path` by `concurrency` clients, after one
    warm-up; each must answer `status`."""
    latencies: list[float] = []
    async with aiohttp.ClientSession() as session:
        async def one() -> float:
            started = time.perf_counter()
            async with session.get(f"{base}/{path}") as response:
                await response.read()
                assert response.status == status, (path, response.status)
            return (time.perf_counter() - started) * 1000

        async def worker(count: int) -> None:
            for _ in range(count):
                latencies.append(await one())

        await one()
        per = max(1, requests // concurrency)
        await asyncio.gather(*(worker(per) for _ in range(concurrency)))
    return latencies


def print_rows(rows: list[dict]) -> None:
    print("| query | HTTP status | p50 ms | p95 ms | plan: indexes; instance partitions read |")
    print("|---|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['query']} | {row['status']} | {row['p50_ms']} | {row['p95_ms']} | "
              f"{row['plan']} |")


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
    parser.add_argument("--per-series", type=int, default=100,
                        help="instances in each series (1: as many studies as 10^9 would hold "
                             "at 100 per series, for 100 times fewer instances)")
    parser.add_argument("--partitions", type=int,
                        help="[server] instance_partitions (default: the archive's)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    loadavg_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ricord-bench-") as tmp:
        http_port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RICORD_")}
        config = []
        if args.partitions:
            Path(tmp, "bench.toml").write_text(
                f"[server]\ninstance_partitions = {args.partitions}\n")
            config = ["--config", f"{tmp}/bench.toml"]
        server = subprocess.Popen(
            [sys.executable, "-m", "ricord_archive", "serve", "--data-dir", f"{tmp}/data",
             "--http-port", str(http_port), "--dimse-port", str(_free_port()), *config],
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
                [sys.executable, "-m", "ricord_archive", "db-url", "--data-dir", f"{tmp}/data",
                 *config], capture_output=True, text=True, check=True, env=env,
            ).stdout.strip()
            started = time.perf_counter()
            sample = await load(url, args.instances, args.per_series)
            load_s = time.perf_counter() - started
            print(f"loaded {args.instances:,} instances in {load_s:.0f} s", file=sys.stderr)
            sample["cursor"] = await deep_cursor(base, sample["studies"] // 2)
            rows = []
            for name, (level, path, scope, status) in queries(sample).items():
                path = path.replace("{cursor}", sample["cursor"])
                latencies = await measure(base, path, status, args.concurrency, args.requests)
                row = {"query": name, "path": path, "status": status,
                       "p50_ms": round(percentile(latencies, 50), 2),
                       "p95_ms": round(percentile(latencies, 95), 2),
                       "plan": await explain(url, level, path, scope)}
                print(f"  {row}", file=sys.stderr)
                rows.append(row)
            tables = await sizes(url)
            loadavg_after = os.getloadavg()
            print(f"\nQIDO-RS on {args.instances:,} instances ({sample['studies']:,} studies, "
                  f"{args.per_series} instances per series), concurrency {args.concurrency}, "
                  f"{args.requests} requests each (nproc {os.cpu_count()}; load average before "
                  f"{', '.join(f'{x:.2f}' for x in loadavg_before)}, after "
                  f"{', '.join(f'{x:.2f}' for x in loadavg_after)}; loaded in {load_s:.0f} s)\n")
            print_rows(rows)
            print_sizes(tables)
            if args.json:
                args.json.write_text(json.dumps(
                    {"date": dt.date.today().isoformat(), "instances": args.instances,
                     "per_series": args.per_series, "studies": sample["studies"],
                     "partitions": tables[TABLES.index("instance")]["partitions"],
                     "concurrency": args.concurrency, "requests": args.requests,
                     "load_s": round(load_s, 1), "loadavg_before": loadavg_before,
                     "loadavg_after": loadavg_after, "rows": rows, "sizes": tables}, indent=2))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)


if __name__ == "__main__":
    asyncio.run(main())
