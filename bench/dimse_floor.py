"""The DIMSE floor: storescu sending N small CT objects (64x64) on one association to the
archive, then C-FIND latency at STUDY level (50 C-FINDs on one pynetdicom association, and 20
findscu processes), then getscu of every study. Prints figures; a fresh data directory each
run.

    python bench/dimse_floor.py [--count 200] [--runs 1] [--repo PATH] [--orthanc | --null]
                                [--work DIR]

`--repo` runs another checkout of the archive (e.g. `git archive main | tar -x -C /tmp/before`)
with this interpreter, for a before/after comparison on the same machine; `--orthanc` runs
Orthanc-SQLite instead (bench/orthanc.py), the same workloads. `--null` measures the floor of
the archive's association code alone: storescu against it in this process, every C-STORE
answered Success at once (the Part 10 bytes built, nothing stored).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import ours
from corpus import generate
from orthanc import Orthanc, build_shim, dcmtk_env, dcmtk_tool
from pynetdicom.presentation import PresentationContext
from workloads import CALLING_AET, cfind_association, findscu_latency, storescu

from ricord_archive.dimse.association import Association, Rejection, Timeouts
from ricord_archive.dimse.commands import C_STORE_RQ, Message
from ricord_archive.dimse.messages import part10
from ricord_archive.dimse.pdu_guard import PduLimits
from ricord_archive.dimse.server import supported_contexts
from ricord_archive.dimse.transport import PduStream

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
        # Orthanc as configured by bench/orthanc.py refuses C-GET
        retrieved = float("nan") if orthanc else c_get(target, work / "got")
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
        "get_inst_s": retrieved,
    }


def c_get(target: object, folder: Path) -> float:
    """inst/s of getscu fetching every study (one process and association per study)."""
    with urllib.request.urlopen(f"{target.dicomweb}/studies", timeout=60) as answer:
        studies = [s["0020000D"]["Value"][0] for s in json.load(answer)]
    shutil.rmtree(folder, ignore_errors=True)
    count = 0
    started = time.perf_counter()
    for n, study in enumerate(studies):
        out = folder / str(n)
        out.mkdir(parents=True)
        subprocess.run(
            [dcmtk_tool("getscu"), "-S", "-aet", CALLING_AET, "-aec", target.aet, "-od",
             str(out), "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
             "127.0.0.1", str(target.dimse_port)], env=dcmtk_env(), capture_output=True, check=True,
            timeout=300,
        )
        count += len(list(out.iterdir()))
    elapsed = time.perf_counter() - started
    shutil.rmtree(folder, ignore_errors=True)
    return count / elapsed


class NullAcceptor:
    """Accepts every association and answers every C-STORE Success at once."""

    def __init__(self) -> None:
        self.contexts = supported_contexts()
        storage = frozenset(c.abstract_syntax for c in self.contexts)
        self.handlers = {C_STORE_RQ: (self.store, storage)}

    async def admit(self, association: Association) -> Rejection | None:
        return None

    def accepted(self, association: Association) -> None: ...
    def rejected(self, association: Association, rejection: Rejection) -> None: ...
    def closed(self, association: Association, how: str) -> None: ...

    async def store(self, association: Association, request: Message,
                    context: PresentationContext) -> None:
        command = request.command
        part10(command["AffectedSOPClassUID"], command["AffectedSOPInstanceUID"], context,
               request.dataset or b"")
        await association.respond(request, context, 0x0000,
                                  AffectedSOPInstanceUID=command["AffectedSOPInstanceUID"])


async def null_floor(files: list[Path]) -> float:
    """inst/s of storescu (one association) against the association code answering at once."""
    acceptor = NullAcceptor()

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = PduStream(reader, writer, PduLimits(1 << 20), "storescu", 60)
        await Association(stream, acceptor, "127.0.0.1", 0, 1 << 20, Timeouts(60, 30, 60)).run()

    server = await asyncio.start_server(connected, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    started = time.perf_counter()
    sender = await asyncio.create_subprocess_exec(
        dcmtk_tool("storescu"), "-aec", "RICORD", "127.0.0.1", str(port), *map(str, files),
        stdout=subprocess.DEVNULL, env=dcmtk_env(),
    )
    if await sender.wait() != 0:
        raise RuntimeError("storescu failed")
    elapsed = time.perf_counter() - started
    server.close()
    return len(files) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--repo", type=Path, default=None)
    parser.add_argument("--orthanc", action="store_true")
    parser.add_argument("--null", action="store_true")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dimse-floor")
    args = parser.parse_args()
    if args.repo is not None:
        ours.REPO = args.repo.resolve()
    corpus = args.work / "corpus"
    if args.null:
        files = generate(corpus, names=("small",), log=lambda _: None)["small"].files
        for _ in range(args.runs):
            rate = asyncio.run(null_floor(files[:args.count]))
            print(f"association code answering at once: {args.count} CT 64x64 on one "
                  f"association {rate:.0f} inst/s", flush=True)
        return 0
    for n in range(args.runs):
        figures = run(args.count, args.work / f"run-{n}", corpus, args.orthanc)
        name = "orthanc-sqlite" if args.orthanc else ours.REPO
        print(f"{name}: {args.count} CT 64x64 on one association "
              f"{figures['store_inst_s']:.0f} inst/s; C-FIND STUDY ({figures['cfind_matches']:.0f}"
              f" matches) median {figures['cfind_assoc_ms']:.2f} ms on one association, "
              f"{figures['findscu_ms']:.1f} ms per findscu process; C-GET "
              f"{figures['get_inst_s']:.0f} inst/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
