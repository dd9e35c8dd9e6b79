"""The DIMSE floor: storescu sending N small CT objects (64x64) on one association to the
archive, then C-FIND latency at STUDY level (50 C-FINDs on one pynetdicom association, and 20
findscu processes). Prints figures; a fresh data directory each run.

    python bench/dimse_floor.py [--count 200] [--runs 1] [--repo PATH] [--orthanc] [--work DIR]

`--repo` runs another checkout of the archive (e.g. `git archive main | tar -x -C /tmp/before`)
with this interpreter, for a before/after comparison on the same machine; `--orthanc` runs
Orthanc-SQLite instead (bench/orthanc.py), the same workloads.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import ours
from corpus import generate
from orthanc import Orthanc, build_shim
from workloads import cfind_association, findscu_latency, storescu

STUDY_KEYS = {"StudyInstanceUID": "", "PatientID": "", "StudyDate": "", "ModalitiesInStudy": ""}


def run(count: int, work: Path, corpus: Path, orthanc: bool) -> dict[str, float]:
    files = generate(corpus, names=("small",), log=lambda _: None)["small"].files[:count]
    target = Orthanc(work, "sqlite", build_shim(work)) if orthanc else ours.Ours(work)
    target.start()
    try:
        seconds = storescu(target, files)
        on_association = cfind_association(target, {"studies": STUDY_KEYS}, 50, 30)
        latencies, matches = on_association["studies"]
        per_process = findscu_latency(target, STUDY_KEYS, 20, 30)
    finally:
        if orthanc:
            target.stop()
            shutil.rmtree(target.root, ignore_errors=True)
        else:
            target.cleanup()
    return {
        "store_inst_s": len(files) / seconds,
        "cfind_assoc_ms": statistics.median(latencies),
        "cfind_matches": matches,
        "findscu_ms": statistics.median(per_process),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--repo", type=Path, default=None)
    parser.add_argument("--orthanc", action="store_true")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dimse-floor")
    args = parser.parse_args()
    if args.repo is not None:
        ours.REPO = args.repo.resolve()
    corpus = args.work / "corpus"
    for n in range(args.runs):
        figures = run(args.count, args.work / f"run-{n}", corpus, args.orthanc)
        name = "orthanc-sqlite" if args.orthanc else ours.REPO
        print(f"{name}: {args.count} CT 64x64 on one association "
              f"{figures['store_inst_s']:.0f} inst/s; C-FIND STUDY ({figures['cfind_matches']:.0f}"
              f" matches) median {figures['cfind_assoc_ms']:.2f} ms on one association, "
              f"{figures['findscu_ms']:.1f} ms per findscu process", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
