"""The CPU floor of our ingest: each stage of the pipeline timed on its own, in one process,
with no server, network or database, on the corpus of bench/corpus.py.

    python bench/ingest_cpu.py [--count 200]

Prints, per corpus set (400 CT 512x512, 500 CT 64x64), the milliseconds per instance of each
stage (parse and acceptance policy; de-identification; Part 10 serialization; the index
record; DICOM JSON; SHA-256; the durable blob write) and their sum, and what that sum allows:
instances per second on one core and on every core of the machine, against the ingest target
of issue #6 (1.5x Orthanc-SQLite, measured in the same corpus by bench/compare.py). Whatever
the server adds (protocols, PostgreSQL, hand-offs) comes on top. Prints figures; asserts
nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from corpus import generate

from ricord_archive import dicom_io
from ricord_archive.blobstore import FileBlobStore
from ricord_archive.config import SiteConfig
from ricord_archive.deid import DeidContext, Keyring, deidentify
from ricord_archive.dicom_json import index_record, instance_path, to_json
from ricord_archive.ingest import admission

# Orthanc-SQLite's ingest on this machine (bench/RESULTS.md, same corpus), inst/s
ORTHANC = {"big": {"storescu, 1 association": 226, "storescu, 4 associations": 405,
                   "STOW-RS, 4 clients": 362},
           "small": {"storescu, 1 association": 468, "STOW-RS, 4 clients": 689}}
DESCRIPTIONS = {"big": "CT 512x512 (527 KB)", "small": "CT 64x64 (10.6 KB)"}
STAGES = ("parse + policy", "de-identify", "serialize", "index record", "DICOM JSON", "SHA-256",
          "blob write (fsync)")


def measure(files: list[Path], blobs: FileBlobStore) -> dict[str, float]:
    """Median milliseconds per instance of each stage."""
    context = DeidContext("123456", "123456-000001", -100, Keyring(os.urandom(32)), "RICORD")
    site = SiteConfig("bench")
    timings: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for path in files:
        data = path.read_bytes()
        marks = [time.perf_counter()]
        dataset = admission(data, 2**31, site, True).dataset
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
            stages = measure(corpus[name].files[:args.count], blobs)
            total = sum(stages.values())
            cpu = total - stages["blob write (fsync)"]
            print(f"{name}: {DESCRIPTIONS[name]}, median of {args.count}")
            print("| stage | ms per instance |\n|---|---:|")
            for stage, ms in stages.items():
                print(f"| {stage} | {ms:.2f} |")
            print(f"| **sum** | **{total:.2f}** |\n")
            print(f"CPU alone ({cpu:.2f} ms) allows at most {1000 / cpu:.0f} inst/s on one core, "
                  f"{cores * 1000 / cpu:.0f} on {cores}; the serial chain of one association "
                  f"at most {1000 / total:.0f} inst/s.")
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
