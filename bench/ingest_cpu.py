"""The CPU floor of our ingest: each stage of the pipeline timed on its own, in one process,
with no server, network or database, on the corpus of bench/corpus.py.

    python bench/ingest_cpu.py [--count 200]

Prints, per corpus set (400 CT 512x512, 500 CT 64x64), the milliseconds per instance of each
stage of both paths side by side: the pydicom path (parse and acceptance policy;
de-identification; Part 10 serialization; the index record; DICOM JSON) and the byte walker's
(tokenize and acceptance policy; the one pass that de-identifies and writes the Part 10 bytes,
DICOM JSON and index record; the JSON documents serialized), then what both share (SHA-256, the
durable blob write), their sums, and what the sums allow: instances per second on one core and
on every core of the machine, against the ingest target of issue #6 (1.5x Orthanc-SQLite,
measured in the same corpus by bench/compare.py). Then the walker's work inline against the
same work sent to a process pool (`ingest_workers`): what one object costs the event loop and
how long it waits. Whatever the server adds (protocols, PostgreSQL) comes on top. Prints
figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from corpus import generate

from ricord_archive.blobstore import FileBlobStore
from ricord_archive.config import SiteConfig
from ricord_archive.deid import DeidContext, Keyring, deidentify
from ricord_archive.dicom import io as dicom_io
from ricord_archive.dicom.json import index_record, instance_path, to_json
from ricord_archive.services.ingest import (
    describe_walked,
    fast_admission,
    prepare_object,
    pydicom_admission,
    walk_or_none,
)

# Orthanc-SQLite's ingest on this machine (bench/RESULTS.md, same corpus), inst/s
ORTHANC = {"big": {"storescu, 1 association": 226, "storescu, 4 associations": 405,
                   "STOW-RS, 4 clients": 362},
           "small": {"storescu, 1 association": 468, "STOW-RS, 4 clients": 689}}
DESCRIPTIONS = {"big": "CT 512x512 (527 KB)", "small": "CT 64x64 (10.6 KB)"}
PYDICOM = ("parse + policy", "de-identify", "serialize", "index record", "DICOM JSON")
WALKER = ("tokenize + policy", "one pass: de-identify, serialize, JSON, record",
          "JSON documents (orjson)")
SHARED = ("SHA-256", "blob write (fsync)")
STAGES = PYDICOM + SHARED
CONTEXT = DeidContext("123456", "123456-000001", -100, Keyring(os.urandom(32)), "RICORD")
SITE = SiteConfig("bench")


def measure(files: list[Path], blobs: FileBlobStore) -> dict[str, float]:
    """Median milliseconds per instance of each stage of the pydicom path."""
    context, site = CONTEXT, SITE
    timings: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for path in files:
        data = path.read_bytes()
        marks = [time.perf_counter()]
        dataset = pydicom_admission(data, 2**31, site, True).dataset
        marks.append(time.perf_counter())
        syntax = str(dataset.file_meta.TransferSyntaxUID)
        deidentify(dataset, context)
        marks.append(time.perf_counter())
        written, _ = dicom_io.serialize(dataset, syntax)
        marks.append(time.perf_counter())
        record = index_record(dataset)
        marks.append(time.perf_counter())
        to_json(dataset, instance_path(record.study_uid, record.series_uid, record.sop_uid))
        marks.append(time.perf_counter())
        hashlib.sha256(written).digest()
        marks.append(time.perf_counter())
        blobs.write(blobs.new_key(), written)
        marks.append(time.perf_counter())
        for stage, start, end in zip(STAGES, marks[:-1], marks[1:], strict=True):
            timings[stage].append((end - start) * 1000)
    return {stage: statistics.median(values) for stage, values in timings.items()}


def measure_walker(files: list[Path], blobs: FileBlobStore) -> dict[str, float]:
    """Median milliseconds per instance of each stage of the byte walker's path."""
    stages = WALKER + SHARED
    timings: dict[str, list[float]] = {stage: [] for stage in stages}
    for path in files:
        data = path.read_bytes()
        marks = [time.perf_counter()]
        admitted = fast_admission(data, 2**31, SITE)
        marks.append(time.perf_counter())
        walked = walk_or_none(admitted.dataset, CONTEXT) if admitted else None
        if walked is None:
            raise SystemExit(f"{path}: the walker does not handle this object")
        marks.append(time.perf_counter())
        describe_walked(walked, b"")
        marks.append(time.perf_counter())
        hashlib.sha256(walked.data).digest()
        marks.append(time.perf_counter())
        blobs.write(blobs.new_key(), walked.data)
        marks.append(time.perf_counter())
        for stage, start, end in zip(stages, marks[:-1], marks[1:], strict=True):
            timings[stage].append((end - start) * 1000)
    return {stage: statistics.median(values) for stage, values in timings.items()}


def _walker_work(data: bytes) -> tuple:
    admitted = fast_admission(data, 2**31, SITE)
    assert admitted is not None
    return prepare_object(admitted.dataset, 2**31, CONTEXT)


def inline_or_pool(files: list[Path], workers: int) -> dict[str, float]:
    """The walker's CPU work (admission, one pass, describe with SHA-256) inline, against the
    same work in a process pool as `ingest_workers` runs it: milliseconds per instance the
    loop's process spends, and the wait for one object."""
    datas = [path.read_bytes() for path in files]
    inline = []
    for data in datas:
        start = time.perf_counter()
        _walker_work(data)
        inline.append((time.perf_counter() - start) * 1000)
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        list(pool.map(_walker_work, datas[:workers * 2]))  # start and warm the workers
        waits = []
        cpu_start = time.process_time()
        for data in datas:
            start = time.perf_counter()
            pool.submit(_walker_work, data).result()
            waits.append((time.perf_counter() - start) * 1000)
        parent_cpu = (time.process_time() - cpu_start) * 1000 / len(datas)
        start = time.perf_counter()
        list(pool.map(_walker_work, datas))
        pool_rate = len(datas) / (time.perf_counter() - start)
    return {"inline (loop CPU = wait)": statistics.median(inline),
            "pool: wait for one object": statistics.median(waits),
            "pool: loop process CPU (pickling both ways)": parent_cpu,
            "pool: inst/s, all workers busy": pool_rate,
            "inline: inst/s, one core": 1000 / statistics.median(inline)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/var/tmp/ricord-bench"))
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--count", type=int, default=200, help="instances per set")
    args = parser.parse_args()
    dicom_io.configure_pydicom()
    corpus = generate(args.work_dir / "corpus", args.seed, ("big", "small"))
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {cores} cores; load average {os.getloadavg()[0]:.2f}; "
          f"Python {sys.version.split()[0]}\n")
    with tempfile.TemporaryDirectory(dir=args.work_dir) as scratch:
        blobs = FileBlobStore(Path(scratch))
        for name in ("big", "small"):
            files = corpus[name].files[:args.count]
            stages = measure(files, blobs)
            walker = measure_walker(files, blobs)
            print(f"{name}: {DESCRIPTIONS[name]}, median of {args.count}")
            print("| stage | pydicom path, ms | stage | byte walker, ms |\n|---|---:|---|---:|")
            left, right = list(PYDICOM), list(WALKER)
            for row in range(max(len(left), len(right))):
                a = f"| {left[row]} | {stages[left[row]]:.2f} " if row < len(left) else "| | "
                b = f"| {right[row]} | {walker[right[row]]:.2f} |" if row < len(right) else "| | |"
                print(a + b)
            for stage in SHARED:
                print(f"| {stage} | {stages[stage]:.2f} | {stage} | {walker[stage]:.2f} |")
            sums = {}
            for path_name, timed in (("pydicom path", stages), ("byte walker", walker)):
                total = sum(timed.values())
                sums[path_name] = (total, total - timed["blob write (fsync)"])
            print(f"| **sum** | **{sums['pydicom path'][0]:.2f}** | **sum** | "
                  f"**{sums['byte walker'][0]:.2f}** |\n")
            for path_name, (total, cpu) in sums.items():
                print(f"{path_name}: CPU alone ({cpu:.2f} ms) allows at most {1000 / cpu:.0f} "
                      f"inst/s on one core, {cores * 1000 / cpu:.0f} on {cores}; the serial "
                      f"chain of one association at most {1000 / total:.0f} inst/s.")
            print(f"\nthe walker's CPU work inline or in a pool of {cores} processes:")
            for label, value in inline_or_pool(files[:min(len(files), 100)], cores).items():
                unit = "inst/s" if "inst/s" in label else "ms"
                print(f"  {label}: {value:.2f} {unit}")
            for workload, rate in ORTHANC[name].items():
                target = 1.5 * rate
                print(f"  target {workload}: 1.5 x {rate} = {target:.0f} inst/s: at most "
                      f"{1000 / target:.2f} ms per instance one after the other, or "
                      f"{cores * 1000 / target:.2f} ms of CPU per instance with all {cores} "
                      "cores busy")
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
