"""Durable blob writes: one file per blob (temporary file, fsync, rename, folder fsync) against
segment files (append, one fdatasync shared by concurrent writers). Prints ms per write (wall
time over all writes) and the median latency of one write, for 10 KB and 527 KB objects and
1 and 4 concurrent writers. `segments` writes to a segment reserved before use (every segment
but a process's first); `first-seg` to a process's first segment, reserved while it is used.

    python bench/blob_write.py [--dir DIR] [--writes N] [--segment-mib M]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from ricord_archive.blobstore import FileBlobStore

SIZES = {"10 KB": 10_600, "527 KB": 527_000}


def run(store: FileBlobStore, data: bytes, writers: int, writes: int) -> tuple[float, float]:
    """(ms per write over the wall time, median ms of one write)."""
    latencies: list[float] = []
    lock = threading.Lock()

    def writer(count: int) -> None:
        for _ in range(count):
            key = store.new_key()
            started = time.perf_counter()
            store.write(key, data)
            with lock:
                latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=writer, args=(writes // writers,)) for _ in range(writers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return wall / len(latencies) * 1000, statistics.median(latencies) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="a folder on the disk to measure")
    parser.add_argument("--writes", type=int, default=200)
    parser.add_argument("--segment-mib", type=int, default=64)
    args = parser.parse_args()
    segment_bytes = args.segment_mib * 1024**2
    flushes = [0]
    fdatasync = os.fdatasync

    def counted(fd: int) -> None:
        flushes[0] += 1
        fdatasync(fd)

    os.fdatasync = counted  # counts the group flushes
    print(f"{'store':<10} {'object':>7} {'writers':>7} {'ms/write':>9} {'median ms':>9} "
          f"{'flushes/write':>13}")
    for label, size in SIZES.items():
        data = os.urandom(size)
        for writers in (1, 4):
            for name in ("files", "first-seg", "segments"):
                with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
                    store = FileBlobStore(Path(scratch), None if name == "files" else
                                          segment_bytes)
                    # warm up: the first segment made, or (segments) used up
                    fill = segment_bytes // size + 1 if name == "segments" else 0
                    run(store, data, 1, 8 + fill)
                    store.settle()
                    flushes[0] = 0
                    per_write, median = run(store, data, writers, args.writes)
                    store.close()
                ratio = f"{flushes[0] / args.writes:.2f}" if name != "files" else "-"
                print(f"{name:<10} {label:>7} {writers:>7} {per_write:>9.2f} {median:>9.2f} "
                      f"{ratio:>13}")
    os.fdatasync = fdatasync


if __name__ == "__main__":
    main()
