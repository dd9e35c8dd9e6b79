"""Side by side with Orthanc (issue #6) and retrieve figures (issue #5), in one command.

    python bench/compare.py --runs 3 --json bench/last.json

Runs the same workloads, on the same seeded corpus (bench/corpus.py), against our archive
(`python -m ricord_archive serve`, embedded PostgreSQL, a fresh data directory for each
workload), Orthanc 1.10.1 + DICOMweb 1.7 with its SQLite index, and Orthanc with the PostgreSQL
index plugin on Debian's PostgreSQL 15 (a cluster the bench creates under its work directory),
interleaved: each run measures every target, in an order rotated from run to run. Prints one
table of medians over the runs: our figure, Orthanc's, and the ratio ours / Orthanc, with the
targets of issues #5 and #6; `--json` also writes every run's figures.

What it needs it installs (as root, apt-get, no service started: bench/orthanc.py); what it
starts (our archive, Orthanc, PostgreSQL) it stops, on errors and Ctrl-C too. All traffic is
on 127.0.0.1; every loop is bounded in count and time. Prints figures; asserts nothing.

Workloads. Ingest (after a reset each): DCMTK storescu on one association (400 CT 512x512,
500 CT 64x64) and on 4 concurrent associations (400 CT), STOW-RS in batches of 50 from 1 and 4
concurrent clients, with peak memory of the server and of its PostgreSQL. Then the query
archive (400 + 5,000 + 4 = 5,404 instances, storescu x4) for QIDO-RS at 8 concurrent clients,
C-FIND (a findscu process per query; one pynetdicom association) and WADO-RS (series
retrieval, series metadata, frames, a 10 MB radiograph frame, rendered JPEG). Our archive
changes every UID and patient ID: our values are learned through `ricord-archive lookup` and
QIDO after ingest, and each server is queried with its own. Machine ceilings (loopback TCP,
write+fsync per file) are measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import workloads as w
from corpus import CorpusSet, generate
from orthanc import (
    Orthanc,
    PeerError,
    PostgresCluster,
    build_shim,
    dcmtk_tool,
    ensure_installed,
)
from ours import REPO, Ours

TARGETS = ("ours", "orthanc-sqlite", "orthanc-pg")
BASELINE = "orthanc-sqlite"


def log(message: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Goal:
    op: str                 # ">=" or "<=" or "<"
    value: float
    ratio: bool             # against Orthanc-SQLite (ours / Orthanc), else an absolute figure
    issue: int

    def text(self) -> str:
        return f"{self.op} {self.value:g}{'x' if self.ratio else ''} (#{self.issue})"

    def shortfall(self, ours: float, baseline: float | None) -> float | None:
        """None when met or not measurable, else the factor by which the figure misses."""
        figure = ours / baseline if self.ratio and baseline else ours
        if figure is None or math.isnan(figure) or (self.ratio and not baseline):
            return None
        if self.op == ">=":
            return None if figure >= self.value else self.value / figure
        return None if figure < self.value or (self.op == "<=" and figure == self.value) \
            else figure / self.value


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    goals: tuple[Goal, ...] = ()
    machine: bool = False


INGEST = (Goal(">=", 1.5, True, 6),)
QIDO_P95 = (Goal("<=", 0.5, True, 6),)
ROWS = (
    Row("loopback_mbs", "machine: loopback TCP, Python sendall 1 MiB blocks, MB/s", machine=True),
    Row("fsync_big_fps", "machine: write+fsync per file, 400 x 527 KB, files/s", machine=True),
    Row("fsync_big_mbs", "machine: write+fsync per file, 400 x 527 KB, MB/s", machine=True),
    Row("fsync_small_fps", "machine: write+fsync per file, 500 x 10.6 KB, files/s",
        machine=True),
    Row("cstore_big_1", "C-STORE storescu, 1 assoc, 400 CT 512², inst/s", INGEST),
    Row("cstore_big_1_mbs", "C-STORE storescu, 1 assoc, 400 CT 512², MB/s"),
    Row("cstore_small_1", "C-STORE storescu, 1 assoc, 500 CT 64², inst/s", INGEST),
    Row("cstore_big_4", "C-STORE storescu, 4 assoc, 400 CT 512², inst/s", INGEST),
    Row("stow_big_c1", "STOW-RS 50/request, 1 client, 400 CT 512², inst/s", INGEST),
    Row("stow_big_c4", "STOW-RS 50/request, 4 clients, 400 CT 512², inst/s", INGEST),
    Row("stow_small_c1", "STOW-RS 50/request, 1 client, 500 CT 64², inst/s", INGEST),
    Row("stow_small_c4", "STOW-RS 50/request, 4 clients, 500 CT 64², inst/s", INGEST),
    Row("rss_server_mb", "peak RSS during ingest: server process(es), MB"),
    Row("rss_pg_mb", "peak PSS during ingest: its PostgreSQL, MB"),
    Row("load_inst_s", "load query archive, 5,404 inst, storescu x4, inst/s"),
    Row("qido_pid_p50", "QIDO c=8 studies?PatientID=, p50 ms"),
    Row("qido_pid_p95", "QIDO c=8 studies?PatientID=, p95 ms", QIDO_P95),
    Row("qido_name_p50", "QIDO c=8 studies?PatientName=prefix*, p50 ms"),
    Row("qido_name_p95", "QIDO c=8 studies?PatientName=prefix*, p95 ms", QIDO_P95),
    Row("qido_date_p50", "QIDO c=8 studies?StudyDate=range, p50 ms"),
    Row("qido_date_p95", "QIDO c=8 studies?StudyDate=range, p95 ms", QIDO_P95),
    Row("qido_page_p50", "QIDO c=8 studies?limit=25&offset=half, p50 ms"),
    Row("qido_page_p95", "QIDO c=8 studies?limit=25&offset=half, p95 ms", QIDO_P95),
    Row("qido_series25_p50", "QIDO c=8 a series' instances (25), p50 ms"),
    Row("qido_series25_p95", "QIDO c=8 a series' instances (25), p95 ms", QIDO_P95),
    Row("qido_series200_p50", "QIDO c=8 a series' instances (200), p50 ms"),
    Row("qido_series200_p95", "QIDO c=8 a series' instances (200), p95 ms", QIDO_P95),
    Row("qido_patient_instances_p50", "QIDO c=8 a patient's instances, limit=100, p50 ms"),
    Row("qido_patient_instances_p95", "QIDO c=8 a patient's instances, limit=100, p95 ms",
        QIDO_P95),
    Row("cfind_proc_pid_p50", "C-FIND findscu process, by PatientID, p50 ms"),
    Row("cfind_proc_name_p50", "C-FIND findscu process, PatientName prefix*, p50 ms"),
    Row("cfind_proc_date_p50", "C-FIND findscu process, StudyDate range, p50 ms"),
    Row("cfind_assoc_pid_p50", "C-FIND one association, by PatientID, p50 ms"),
    Row("cfind_assoc_name_p50", "C-FIND one association, PatientName prefix*, p50 ms"),
    Row("cfind_assoc_date_p50", "C-FIND one association, StudyDate range, p50 ms"),
    Row("wado_series_mbs", "WADO-RS series 200 x 512² (105 MB), warm, MB/s",
        (Goal(">=", 1, True, 6), Goal(">=", 1000, False, 5))),
    Row("wado_metadata_p50", "WADO-RS series /metadata (200 inst), p50 ms",
        (Goal("<=", 0.2, True, 6), Goal("<", 15, False, 5))),
    Row("wado_metadata_p95", "WADO-RS series /metadata (200 inst), p95 ms",
        (Goal("<=", 0.2, True, 6),)),
    Row("wado_frame_p50", "WADO-RS frame 512² sequential, p50 ms",
        (Goal("<=", 1, True, 6), Goal("<", 3, False, 5))),
    Row("wado_frame_p95", "WADO-RS frame 512² sequential, p95 ms"),
    Row("wado_frames8_rps", "WADO-RS frames 512², 8 concurrent, req/s", (Goal(">=", 1, True, 6),)),
    Row("wado_frames8_p50", "WADO-RS frames 512², 8 concurrent, p50 ms"),
    Row("wado_cr_p50", "WADO-RS 10 MB radiograph frame, p50 ms", (Goal("<=", 1, True, 6),)),
    Row("wado_cr_mbs", "WADO-RS 10 MB radiograph frame, MB/s at p50"),
    Row("rendered_p50", "WADO-RS rendered JPEG of a 512² slice, p50 ms"),
    Row("rendered_p95", "WADO-RS rendered JPEG of a 512² slice, p95 ms"),
)


def fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def medians(runs: list[dict], target: str) -> dict[str, float]:
    keys = {k for run in runs for k in run.get(target, {})}
    found = {}
    for key in sorted(keys):
        values = [run[target][key] for run in runs
                  if isinstance(run.get(target, {}).get(key), int | float)
                  and not math.isnan(run[target][key])]
        if values:
            found[key] = statistics.median(values)
    return found


def table(median: dict[str, dict[str, float]], targets: tuple[str, ...]) -> str:
    """The markdown table: medians, ratios ours / Orthanc, targets."""
    sqlite, pg = median.get("orthanc-sqlite", {}), median.get("orthanc-pg", {})
    ours, machine = median.get("ours", {}), median.get("machine", {})
    lines = ["| metric | ours | Orthanc SQLite | ours ÷ SQLite | Orthanc PG | ours ÷ PG "
             "| target | met |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for row in ROWS:
        if row.machine:
            if row.key in machine:
                lines.append(f"| {row.label} | {fmt(machine[row.key])} | | | | | | |")
            continue
        mine = ours.get(row.key)
        if mine is None and row.key not in sqlite and row.key not in pg:
            continue
        cells = [row.label, fmt(mine)]
        for other in (sqlite, pg):
            theirs = other.get(row.key)
            cells.append(fmt(theirs))
            cells.append(f"{mine / theirs:.2f}x" if mine is not None and theirs else "—")
        cells.append("; ".join(g.text() for g in row.goals))
        verdicts = []
        for goal in row.goals:
            if mine is None or (goal.ratio and not sqlite.get(row.key)):
                verdicts.append("—")
                continue
            short = goal.shortfall(mine, sqlite.get(row.key))
            verdicts.append("met" if short is None else f"missed, {short:.2f}x short")
        cells.append("; ".join(verdicts))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ the run
class Bench:
    def __init__(self, args: argparse.Namespace, corpus: dict[str, CorpusSet], work: Path,
                 targets: dict) -> None:
        self.args = args
        self.corpus = corpus
        self.work = work
        self.targets = targets
        self.errors: list[str] = []
        big, small = corpus["big"], corpus["small"]
        self.big_files, self.small_files = big.files, small.files
        self.query_files = big.files + corpus["qido"].files + corpus["cr"].files
        log("building STOW-RS request bodies (batches of 50)")
        self.big_batches = w.multipart_batches(self.big_files)
        self.small_batches = w.multipart_batches(self.small_files)
        self.sizes = {"big": big.total_bytes, "small": small.total_bytes}

    def postgres_pids(self, name: str):
        target = self.targets[name]
        if name == "ours":
            return target.postgres_pids
        return target.pg.pids if target.pg else list

    # -- machine ceilings
    def machine(self) -> dict[str, float]:
        figures = {"loopback_mbs": w.loopback_throughput(3.0)}
        big = [p.read_bytes() for p in self.big_files]
        figures["fsync_big_fps"], figures["fsync_big_mbs"] = w.fsync_rate(big, self.work / "fs")
        small = [p.read_bytes() for p in self.small_files]
        figures["fsync_small_fps"], _ = w.fsync_rate(small, self.work / "fs")
        return figures

    # -- ingest
    def ingest(self, name: str) -> dict[str, float]:
        target = self.targets[name]
        memory = w.PeakMemory(lambda: target.pid, self.postgres_pids(name))
        jobs = (
            ("cstore_big_1", "big", lambda: w.storescu(target, self.big_files, 1)),
            ("cstore_small_1", "small", lambda: w.storescu(target, self.small_files, 1)),
            ("cstore_big_4", "big", lambda: w.storescu(target, self.big_files, 4)),
            ("stow_big_c1", "big", lambda: asyncio.run(w.stow(target, self.big_batches, 1))),
            ("stow_big_c4", "big", lambda: asyncio.run(w.stow(target, self.big_batches, 4))),
            ("stow_small_c1", "small",
             lambda: asyncio.run(w.stow(target, self.small_batches, 1))),
            ("stow_small_c4", "small",
             lambda: asyncio.run(w.stow(target, self.small_batches, 4))),
        )
        figures: dict[str, float] = {}
        for key, corpus_set, job in jobs:
            count = len(self.big_files if corpus_set == "big" else self.small_files)
            try:
                target.reset()
                with memory:
                    seconds = job()
                stored = asyncio.run(w.count_instances(target))
                if stored != count:
                    raise w.WorkloadError(f"{stored} instances stored of {count}")
            except (w.WorkloadError, aiohttp.ClientError, OSError, subprocess.SubprocessError
                    ) as exc:
                self.error(f"{name} {key}: {exc}")
                continue
            figures[key] = count / seconds
            figures[f"{key}_mbs"] = self.sizes[corpus_set] / 1e6 / seconds
            log(f"  {name} {key}: {figures[key]:.1f} inst/s, {figures[f'{key}_mbs']:.1f} MB/s")
        figures["rss_server_mb"] = memory.server_mb
        if memory.postgres_mb:
            figures["rss_pg_mb"] = memory.postgres_mb
        return figures

    def error(self, message: str) -> None:
        log(f"  ERROR {message}")
        self.errors.append(message)

    # -- query and retrieve
    def query(self, name: str) -> dict[str, float]:
        target = self.targets[name]
        target.reset()
        figures: dict[str, float] = {}
        seconds = w.storescu(target, self.query_files, 4, timeout=1800)
        figures["load_inst_s"] = len(self.query_files) / seconds
        stored = asyncio.run(w.count_instances(target))
        log(f"  {name} loaded {stored} instances at {figures['load_inst_s']:.0f} inst/s")
        if stored != len(self.query_files):
            raise w.WorkloadError(f"{name}: {stored} instances of {len(self.query_files)}")
        ids = asyncio.run(self.discover(name, target))
        figures.update({f"{k}_matches": v for k, v in ids["matches"].items()})
        for step in (self.qido, self.cfind, self.wado):
            try:
                figures.update(step(name, target, ids))
            except (w.WorkloadError, aiohttp.ClientError, OSError, subprocess.SubprocessError
                    ) as exc:
                self.error(f"{name} {step.__name__}: {exc}")
        return figures

    async def discover(self, name: str, target) -> dict:
        """This server's values for the queries: its patient IDs and UIDs (ours are
        pseudonyms and new UIDs, learned through lookup and QIDO)."""
        qido_patients = [p["id"] for p in self.corpus["qido"].patients]
        big_patient = self.corpus["big"].patients[0]["id"]
        cr_patient = self.corpus["cr"].patients[0]["id"]
        wanted = [*qido_patients, big_patient, cr_patient]
        if name == "ours":
            ids = target.pseudonyms(wanted)
            # ten patients whose pseudonyms share all digits but the last: 'SITEID-00002*'
            chosen = next(p for p in qido_patients if 10 <= int(ids[p][-6:]) < 50)
            wildcard = ids[chosen][:-1] + "*"
        else:
            ids = {p: p for p in wanted}
            chosen = qido_patients[12]
            wildcard = self.corpus["qido"].patients[12]["name"].split("^")[0] + "^*"
        base = target.dicomweb
        async with aiohttp.ClientSession(timeout=w.TIMEOUT) as session:
            studies = await w.get_json(session, f"{base}/studies?limit=1000")
            dates = sorted(str(w.value(s, "00080020")) for s in studies)
            k = len(dates) // 3   # ten studies, without a tie at either end of the range
            while k + 10 < len(dates) and (dates[k - 1] == dates[k]
                                           or dates[k + 9] == dates[k + 10]):
                k += 1
            date_range = f"{dates[k]}-{dates[k + 9]}"
            patient_id = ids[chosen]

            async def first_series(patient: str) -> tuple[str, str]:
                found = await w.get_json(session, f"{base}/studies?PatientID={patient}")
                study = sorted(str(w.value(s, "0020000D")) for s in found)[0]
                series = await w.get_json(session, f"{base}/studies/{study}/series")
                return study, sorted(str(w.value(s, "0020000E")) for s in series)[0]

            async def instances(study: str, series: str) -> list[str]:
                found = await w.get_json(
                    session, f"{base}/studies/{study}/series/{series}/instances"
                    f"?includefield=00200013")
                found.sort(key=lambda i: int(w.value(i, "00200013", 0)))
                return [str(w.value(i, "00080018")) for i in found]

            small_study, small_series = await first_series(patient_id)
            big_study, big_series = await first_series(ids[big_patient])
            cr_study, cr_series = await first_series(ids[cr_patient])
            big_instances = await instances(big_study, big_series)
            cr_instance = (await instances(cr_study, cr_series))[0]
        if len(big_instances) != 200:
            raise w.WorkloadError(f"{name}: the big series has {len(big_instances)} instances")
        queries = {
            "qido_pid": f"/studies?PatientID={patient_id}",
            "qido_name": f"/studies?PatientName={wildcard}",
            "qido_date": f"/studies?StudyDate={date_range}",
            "qido_page": f"/studies?limit=25&offset={len(studies) // 2}",
            "qido_series25": f"/studies/{small_study}/series/{small_series}/instances",
            "qido_series200": f"/studies/{big_study}/series/{big_series}/instances",
            # An instance search names its studies (issue #18: `/instances?limit=100` alone is
            # refused with 400); a patient's instances, which both archives answer.
            "qido_patient_instances": f"/instances?PatientID={patient_id}&limit=100",
        }
        matches = {}
        for key, path in queries.items():
            matches[key] = await w.qido_count(base + path)
        log(f"  {name} query values: PatientID={patient_id} PatientName={wildcard} "
            f"StudyDate={date_range}; matches {matches}")
        return {"queries": queries, "matches": matches, "patient_id": patient_id,
                "wildcard": wildcard, "date_range": date_range,
                "big": (big_study, big_series, big_instances),
                "cr": (cr_study, cr_series, cr_instance)}

    def qido(self, name: str, target, ids: dict) -> dict[str, float]:
        figures = {}
        for key, path in ids["queries"].items():
            result = asyncio.run(w.http_latency(
                [target.dicomweb + path], self.args.concurrency, self.args.requests,
                self.args.seconds))
            figures.update(result.figures(key))
            figures[f"{key}_n"] = len(result.ms)
            log(f"  {name} {key}: p50 {figures[key + '_p50']:.1f} ms, "
                f"p95 {figures[key + '_p95']:.1f} ms ({len(result.ms)} requests)")
        return figures

    def cfind(self, name: str, target, ids: dict) -> dict[str, float]:
        returned = {"PatientName": "", "PatientID": "", "StudyDate": "",
                    "StudyInstanceUID": "", "AccessionNumber": ""}
        queries = {"pid": {**returned, "PatientID": ids["patient_id"]},
                   "name": {**returned, "PatientName": ids["wildcard"]},
                   "date": {**returned, "StudyDate": ids["date_range"]}}
        figures = {}
        for key, keys in queries.items():
            latencies = w.findscu_latency(target, keys, self.args.findscu, self.args.seconds)
            figures[f"cfind_proc_{key}_p50"] = w.percentile(latencies, 50)
        for key, (latencies, matches) in w.cfind_association(
                target, queries, self.args.cfind, self.args.seconds).items():
            figures[f"cfind_assoc_{key}_p50"] = w.percentile(latencies, 50)
            figures[f"cfind_{key}_matches"] = matches
        log(f"  {name} C-FIND: " + ", ".join(
            f"{k} {v:.1f}" for k, v in figures.items() if k.endswith("_p50")))
        return figures

    def wado(self, name: str, target, ids: dict) -> dict[str, float]:
        base = target.dicomweb
        study, series, instances = ids["big"]
        cr_study, cr_series, cr_instance = ids["cr"]
        series_url = f"{base}/studies/{study}/series/{series}"
        figures = {}
        accept = w.ACCEPT_DICOM
        if not asyncio.run(w.accepted(f"{series_url}/instances/{instances[0]}", accept)):
            accept = w.ACCEPT_DICOM_PLAIN   # a server that refuses transfer-syntax=*
            figures["wado_series_plain_accept"] = 1
        rates, size = asyncio.run(w.retrieve_series(series_url, accept, self.args.series_repeat,
                                                    60))
        figures["wado_series_mbs"] = w.median(rates)
        figures["wado_series_bytes"] = size

        def check_metadata(body: bytes) -> None:
            if len(json.loads(body)) != len(instances):
                raise w.WorkloadError("series metadata of the wrong size")

        metadata = asyncio.run(w.http_latency(
            [f"{series_url}/metadata"], 1, self.args.metadata, self.args.seconds,
            check=check_metadata))
        figures.update(metadata.figures("wado_metadata"))
        frames = [f"{series_url}/instances/{sop}/frames/1" for sop in instances]

        def check_frame(body: bytes) -> None:
            if len(body) < 512 * 512 * 2:
                raise w.WorkloadError(f"a 512² frame of {len(body)} bytes")

        sequential = asyncio.run(w.http_latency(frames, 1, len(frames), self.args.seconds,
                                                accept=w.ACCEPT_FRAME, check=check_frame))
        figures.update(sequential.figures("wado_frame"))
        concurrent = asyncio.run(w.http_latency(frames, 8, 2 * len(frames), self.args.seconds,
                                                accept=w.ACCEPT_FRAME))
        figures["wado_frames8_rps"] = len(concurrent.ms) / concurrent.seconds
        figures["wado_frames8_p50"] = w.percentile(concurrent.ms, 50)
        cr_url = f"{base}/studies/{cr_study}/series/{cr_series}/instances/{cr_instance}/frames/1"
        cr_sizes = []
        cr = asyncio.run(w.http_latency([cr_url], 1, self.args.cr_frames, self.args.seconds,
                                        accept=w.ACCEPT_FRAME,
                                        check=lambda body: cr_sizes.append(len(body))))
        figures.update(cr.figures("wado_cr"))
        figures["wado_cr_mbs"] = cr_sizes[0] / 1e6 / (figures["wado_cr_p50"] / 1000)
        rendered = [f"{series_url}/instances/{sop}/rendered" for sop in instances]
        if asyncio.run(w.accepted(rendered[0], "image/jpeg")):
            def check_jpeg(body: bytes) -> None:
                if body[:2] != b"\xff\xd8":
                    raise w.WorkloadError("/rendered did not answer a JPEG")

            result = asyncio.run(w.http_latency(rendered, 1, self.args.rendered,
                                                self.args.seconds, accept="image/jpeg",
                                                check=check_jpeg))
            figures.update(result.figures("rendered"))
        log(f"  {name} WADO: series {figures['wado_series_mbs']:.0f} MB/s, metadata p50 "
            f"{figures['wado_metadata_p50']:.1f} ms, frame p50 {figures['wado_frame_p50']:.2f}"
            f" ms, frames c=8 {figures['wado_frames8_rps']:.0f}/s, 10 MB frame p50 "
            f"{figures['wado_cr_p50']:.1f} ms, rendered p50 {figures.get('rendered_p50', 0):.1f}")
        return figures


def peer_versions(target, found: dict[str, str]) -> None:
    """Add a running Orthanc's and its plugins' versions to `found`."""
    if isinstance(target, Orthanc) and target.process:
        with _quietly():
            found.update({f"orthanc {k}": v for k, v in target.versions().items()})


def versions(peers: dict[str, str], pg: PostgresCluster | None) -> dict[str, str]:
    found = {"python": platform.python_version(), "kernel": platform.release(), **peers}
    if pg:
        found["postgresql (Orthanc)"] = pg.version()
    sys.path.insert(0, str(REPO))
    try:
        from ricord_archive import __version__
        from ricord_archive.index.embedded import find_binaries
        found["ricord-archive"] = __version__
        found["postgresql (ours, embedded)"] = subprocess.run(
            [str(find_binaries() / "postgres"), "--version"], capture_output=True, text=True,
            check=False).stdout.strip()
    except Exception as exc:  # a version we cannot read is not worth failing the run
        found["ricord-archive"] = f"? ({exc})"
    dcmtk = subprocess.run([dcmtk_tool("storescu"), "--version"], capture_output=True,
                           text=True, check=False).stdout.splitlines()
    found["dcmtk"] = next((line.strip() for line in dcmtk if "dcmtk" in line.lower()), "?")
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "ricord_archive"],
                           capture_output=True, text=True, check=False).stdout.strip()
    found["git"] = git + (" + uncommitted changes in ricord_archive/" if dirty else "")
    return found


def source_digest() -> str:
    """A digest of our archive's code and migrations: the bench starts new server processes all
    along, so a change to the code during a run would mix two versions."""
    digest = hashlib.sha256()
    for path in sorted([*REPO.glob("ricord_archive/**/*.py"), *REPO.glob("migrations/*.sql")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def machine_facts() -> dict[str, str]:
    memory = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:")), "0")
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               "?")
    return {"nproc": str(os.cpu_count()), "memory": f"{int(memory) / 1024**2:.1f} GiB",
            "cpu": cpu}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--work-dir", type=Path, default=Path("/var/tmp/ricord-bench"),
                        help="corpus cache and runtime files (must be enterable by postgres)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help=f"comma-separated subset of {','.join(TARGETS)}")
    parser.add_argument("--concurrency", type=int, default=8, help="QIDO clients")
    parser.add_argument("--requests", type=int, default=200, help="QIDO requests per query")
    parser.add_argument("--seconds", type=float, default=20,
                        help="time bound of each latency loop")
    parser.add_argument("--findscu", type=int, default=20, help="findscu runs per query")
    parser.add_argument("--cfind", type=int, default=50, help="C-FINDs per query on one assoc")
    parser.add_argument("--metadata", type=int, default=40, help="series metadata requests")
    parser.add_argument("--cr-frames", type=int, default=20, help="10 MB frame requests")
    parser.add_argument("--rendered", type=int, default=100, help="rendered JPEG requests")
    parser.add_argument("--series-repeat", type=int, default=5,
                        help="timed series retrievals after one warm-up")
    parser.add_argument("--ours-config", type=Path,
                        help="a TOML configuration for our archive (e.g. ingest_workers); its "
                             "data directory and ports are the bench's; keep the site 'default'")
    parser.add_argument("--no-ingest", action="store_true", help="query and retrieve only")
    parser.add_argument("--no-query", action="store_true", help="ingest only")
    args = parser.parse_args()
    names = tuple(n for n in args.targets.split(",") if n)
    if not names or set(names) - set(TARGETS):
        parser.error(f"--targets: choose from {', '.join(TARGETS)}")
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)   # even if started with it ignored
    command = "python bench/compare.py " + shlex.join(sys.argv[1:])
    started = time.monotonic()

    installed = ensure_installed() if any(n.startswith("orthanc") for n in names) else []
    if installed:
        log(f"installed {' '.join(installed)}")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.work_dir.chmod(0o755)
    corpus = generate(args.work_dir / "corpus", args.seed, log=log)
    work = args.work_dir / f"run-{os.getpid()}"
    work.mkdir(mode=0o755)
    work.chmod(0o755)
    pg = None
    targets: dict = {}
    peers: dict[str, str] = {}
    result: dict = {"date": dt.date.today().isoformat(), "command": command,
                    "machine": machine_facts(), "source_at_start": source_digest(), "runs": []}
    try:
        if any(n.startswith("orthanc") for n in names):
            shim = build_shim(work)
        if "orthanc-pg" in names:
            pg = PostgresCluster(work / "pg")
            pg.start()
        for name in names:
            targets[name] = (Ours(work, args.ours_config) if name == "ours" else
                             Orthanc(work, name.split("-")[1], shim,
                                     pg if name == "orthanc-pg" else None))
        bench = Bench(args, corpus, work, targets)
        for run in range(args.runs):
            order = names[run % len(names):] + names[:run % len(names)]
            log(f"run {run + 1}/{args.runs}, order {', '.join(order)}")
            figures: dict = {"order": list(order), "loadavg_before": os.getloadavg(),
                             "source": source_digest(),
                             "machine": bench.machine()}
            log("  machine: " + ", ".join(f"{k} {v:.0f}" for k, v in figures["machine"].items()))
            for name in order:
                figures[name] = {}
            for name in order if not args.no_ingest else ():
                log(f" ingest: {name}")
                figures[name].update(bench.ingest(name))
                peer_versions(targets[name], peers)
                targets[name].stop()
            for name in order if not args.no_query else ():
                log(f" query and retrieve: {name}")
                try:
                    figures[name].update(bench.query(name))
                except Exception as exc:  # one target's failure must not lose the others
                    traceback.print_exc()
                    bench.error(f"{name} query phase: {exc!r}")
                peer_versions(targets[name], peers)
                targets[name].stop()
            result["runs"].append(figures)
            result["errors"] = bench.errors
            if args.json:   # written after every run: a long bench interrupted keeps its runs
                args.json.write_text(json.dumps(result, indent=1, default=str))
    except KeyboardInterrupt:
        log("interrupted: stopping what was started")
        if not result["runs"]:
            return 130
    except (PeerError, w.WorkloadError) as exc:
        log(f"failed: {exc}")
        traceback.print_exc()
        if not result["runs"]:
            return 1
    finally:
        for target in targets.values():
            with _quietly():
                target.stop()
        if pg:
            with _quietly():
                pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    result["versions"] = versions(peers, pg)
    result["source_at_end"] = source_digest()
    if result["source_at_end"] != result["source_at_start"]:
        result.setdefault("errors", []).append(
            "ricord_archive/ or migrations/ changed during the run: figures mix versions")
    runs = result["runs"]
    median = {name: medians(runs, name) for name in names}
    median["machine"] = {k: statistics.median(r["machine"][k] for r in runs)
                         for k in runs[0]["machine"]} if runs else {}
    result["median"] = median
    result["table"] = table(median, names)
    result["minutes"] = round((time.monotonic() - started) / 60, 1)
    print(f"\n{command}   ({dt.date.today()}, {len(runs)} runs, medians; "
          f"{result['minutes']} min)")
    print(", ".join(f"{k} {v}" for k, v in {**result['machine'], **result['versions']}.items()))
    print()
    print(result["table"])
    if result.get("errors"):
        print("\nerrors:\n" + "\n".join(f"- {e}" for e in result["errors"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
        print(f"\nwritten {args.json}")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class _quietly:
    """Stopping in `finally` goes on past a failure of one part."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is not None and not isinstance(exc, KeyboardInterrupt):
            log(f"while stopping: {exc}")
            return True
        return False


if __name__ == "__main__":
    sys.exit(main())
