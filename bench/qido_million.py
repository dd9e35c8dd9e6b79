"""QIDO-RS latency on a large index: bulk-load synthetic rows, then time queries over HTTP.

    python bench/qido_million.py --instances 1000000 --concurrency 8 --requests 200

Starts its own archive (embedded PostgreSQL, temporary data directory), loads the index
directly with COPY (realistic rows: 100 instances per series, 2 series per study, 2 studies per
patient, several sites), then for each query prints p50/p95 latency at the given concurrency and
whether PostgreSQL's plan for it uses an index (EXPLAIN). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
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
from ricord_archive.index.search import page_sql
from ricord_archive.matching import Level, parse_query

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
                             f"{200000 + site}-{n:06d}", -(1 + rng.randrange(3650)),
                             STUDIES_PER_PATIENT, STUDIES_PER_PATIENT * SERIES_PER_STUDY,
                             STUDIES_PER_PATIENT * SERIES_PER_STUDY * INSTANCES_PER_SERIES))
        await conn.copy_records_to_table(
            "patient", records=patients,
            columns=["pk", "site_id", "patient_key", "pseudonym", "date_offset_days",
                     "num_studies", "num_series", "num_instances"])
        studies, series_rows, instance_rows = [], [], []
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
                            [modality], SERIES_PER_STUDY,
                            SERIES_PER_STUDY * INSTANCES_PER_SERIES, study_json))
            for k in range(SERIES_PER_STUDY):
                se = s * SERIES_PER_STUDY + k
                series_uid = _uid(2, base_series + se)
                series_json = orjson.dumps({
                    "00080060": _text("CS", modality), "0020000E": _text("UI", series_uid),
                    "00200011": _text("IS", k + 1),
                })
                series_rows.append((base_series + se + 1, base_study + s + 1, series_uid,
                                    modality, k + 1, INSTANCES_PER_SERIES, series_json))
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
                             "patient_age", "modalities", "num_series", "num_instances",
                             "dicom_json"])
                await conn.copy_records_to_table(
                    "series", records=series_rows,
                    columns=["pk", "study_pk", "series_uid", "modality", "series_number",
                             "num_instances", "dicom_json"])
                await conn.copy_records_to_table(
                    "instance", records=instance_rows,
                    columns=["pk", "series_pk", "study_pk", "sop_uid", "sop_class_uid",
                             "instance_number", "transfer_syntax_uid", "blob_key",
                             "size_bytes", "sha256", "dicom_json"])
                print(f"  loaded {base_instance + len(instance_rows) + s * 0:,} ...",
                      file=sys.stderr, end="\r")
                studies, series_rows, instance_rows = [], [], []
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


async def explain(url: str, level: Level, path: str, scope: dict) -> str:
    """Which index PostgreSQL's plan for the query uses ('-' when it scans a table)."""
    params = [tuple(p.split("=", 1)) for p in path.partition("?")[2].split("&") if p]
    sql, values = page_sql(parse_query(level, params, 1000, scope))
    conn = await asyncpg.connect(url)
    try:
        plan = json.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *values))
    finally:
        await conn.close()
    found, seq = set(), set()

    def walk(node: dict) -> None:
        if "Index Name" in node:
            found.add(node["Index Name"])
        if node.get("Node Type") == "Seq Scan":
            seq.add(node.get("Relation Name"))
        for child in node.get("Plans", []):
            walk(child)

    walk(plan[0]["Plan"])
    text = ", ".join(sorted(found)) or "-"
    return text + (f" (seq scan: {', '.join(sorted(seq))})" if seq else "")


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


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
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
            print(f"loaded {args.instances:,} instances in {time.perf_counter() - started:.0f} s")
            rows = []
            for name, (level, path, scope) in queries(sample).items():
                latencies = await measure(base, path, args.concurrency, args.requests)
                plan = await explain(url, level, path, scope)
                rows.append({"query": name, "p50_ms": round(percentile(latencies, 50), 2),
                             "p95_ms": round(percentile(latencies, 95), 2), "index": plan})
            print(f"\nQIDO-RS on {args.instances:,} instances, concurrency {args.concurrency}, "
                  f"{args.requests} requests each (nproc {os.cpu_count()})\n")
            print(f"| {'query':<36} | p50 ms | p95 ms | index used |")
            print(f"|{'-' * 38}|--------|--------|------------|")
            for row in rows:
                print(f"| {row['query']:<36} | {row['p50_ms']:>6} | {row['p95_ms']:>6} | "
                      f"{row['index']} |")
            if args.json:
                args.json.write_text(json.dumps(
                    {"date": dt.date.today().isoformat(), "instances": args.instances,
                     "concurrency": args.concurrency, "rows": rows}, indent=2))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)


if __name__ == "__main__":
    asyncio.run(main())
