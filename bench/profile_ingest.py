"""Where our C-STORE ingest spends its time: py-spy samples the archive while DCMTK's storescu
sends the 400 CT slices (512x512) of bench/corpus.py on one association.

    pip install py-spy
    python bench/profile_ingest.py [--out /var/tmp/ricord-bench/profile-ingest.txt] [--gil] [--stow]

Starts our archive on a fresh data directory, attaches `py-spy record --format raw` (collapsed
stacks: every Python thread of the archive, idle threads left out) for exactly the duration of
the transfer, stops everything, and prints: the instances per second under the profiler (py-spy
pauses the process to sample, so a little lower than unprofiled), the functions where the
samples end (self time), and the share of samples inside each of our functions (inclusive).
The embedded PostgreSQL is a separate process and is not in the profile.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import linecache
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import workloads as w
from corpus import generate
from ours import Ours

FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def frame_name(frame: str) -> tuple[str, str]:
    """('function', 'short/file.py') of a raw py-spy frame 'function (path/file.py:line)'."""
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip(), ""
    path = match["file"]
    for marker in ("ricord_archive/", "site-packages/", "python3.11/", "lib/python"):
        if marker in path:
            path = path.split(marker, 1)[1] if marker != "ricord_archive/" else \
                "ricord_archive/" + path.split(marker, 1)[1]
            break
    return match["function"], path


# Leaf frames where a thread waits rather than works: py-spy's idle detection does not catch
# pynetdicom's 1 ms polling sleeps, a thread pool's queue or selectors here. Judged by the
# source line the frame is on.
WAITING_CALLS = ("time.sleep(", "work_queue.get(", ".select(", "waiter.acquire(",
                 "self._epoll.poll(", "self._selector.poll(", "lock.acquire(")


def waiting(frame: str) -> bool:
    match = FRAME.match(frame.strip())
    if not match or not match["line"]:
        return False
    source = linecache.getline(match["file"], int(match["line"]))
    return any(call in source for call in WAITING_CALLS)


def summarise(raw: Path, rate: int, wall: float, top: int = 15) -> str:
    """Markdown tables of self and inclusive time from a py-spy raw (collapsed) file, in
    seconds of thread time (samples / rate) and in % of the ingest's wall time."""
    own: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = idle = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        raw_frames = stack.split(";")
        if waiting(raw_frames[-1]):
            idle += count
            continue
        frames = [frame_name(f) for f in raw_frames]
        function, path = frames[-1]
        own[f"{function} ({path})"] += count
        for name in {f"{fn} ({p})" for fn, p in frames if p.startswith("ricord_archive/")}:
            inclusive[name] += count
    if not total:
        return "no samples"

    def row(name: str, n: int) -> str:
        return f"| {n / rate:.2f} | {100 * n / rate / wall:.0f} % | `{name}` |"

    busy = total - idle
    lines = [f"{total} samples of all threads at {rate} Hz over {wall:.2f} s of ingest: "
             f"{busy / rate:.2f} s of thread time working, {idle / rate:.2f} s waiting "
             "(polling sleeps, queues, select), left out below.", "",
             "Self time (the function on top of the stack):", "",
             "| s | % of wall | function |", "|---:|---:|---|"]
    lines += [row(name, n) for name, n in own.most_common(top)]
    lines += ["", "Inclusive time of our functions (each sample counts for every function of "
              "ours on its stack):", "", "| s | % of wall | function |", "|---:|---:|---|"]
    lines += [row(name, n) for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        default=Path("/var/tmp/ricord-bench/profile-ingest.txt"),
                        help="py-spy's raw (collapsed-stack) output")
    parser.add_argument("--work-dir", type=Path, default=Path("/var/tmp/ricord-bench"))
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--stow", action="store_true",
                        help="send by STOW-RS (batches of 50, one client) instead of storescu")
    parser.add_argument("--gil", action="store_true",
                        help="sample only the thread holding the GIL (Python CPU time)")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        parser.error("py-spy is not installed: pip install py-spy")
    files = generate(args.work_dir / "corpus", args.seed, ("big",))["big"].files
    work = args.work_dir / "profile"
    archive = Ours(work)
    spy = None
    try:
        archive.start()
        spy = subprocess.Popen([py_spy, "record", "-p", str(archive.pid), "--rate",
                                str(args.rate), "--format", "raw", "-o", str(args.out),
                                *(["--gil"] if args.gil else [])],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)   # py-spy attached
        if args.stow:
            seconds = asyncio.run(w.stow(archive, w.multipart_batches(files), 1))
        else:
            seconds = w.storescu(archive, files, 1)
        spy.send_signal(signal.SIGINT)
        _, errors = spy.communicate(timeout=60)
        if spy.returncode not in (0, -signal.SIGINT) or not args.out.exists():
            raise RuntimeError(f"py-spy failed ({spy.returncode}): {errors[-1000:]}")
        spy = None
        how = "STOW-RS, 50 per request, 1 client" if args.stow else "C-STORE, one association"
        print(f"400 CT 512x512 by {how}, under py-spy ({args.rate} Hz): "
              f"{len(files) / seconds:.1f} inst/s ({seconds:.2f} s)\n")
        print(summarise(args.out, args.rate, seconds))
        print(f"\nraw stacks: {args.out} (e.g. speedscope.app or flamegraph.pl)")
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
            spy.wait()
        archive.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
