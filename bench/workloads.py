"""The measurements of bench/compare.py: each runs one workload against one target (anything
with `dicomweb`, `aet` and `dimse_port`) and returns figures. Every loop is bounded in count
and in time; all traffic goes to 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yarl
from orthanc import dcmtk_env, dcmtk_tool, descendants
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from ricord_archive.dimse import reactor_checkpoint

CALLING_AET = "BENCH"
ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ACCEPT_DICOM_PLAIN = 'multipart/related; type="application/dicom"'
ACCEPT_FRAME = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
TIMEOUT = aiohttp.ClientTimeout(total=300)

logging.getLogger("pynetdicom").setLevel(logging.ERROR)
reactor_checkpoint.install()  # pynetdicom would lose responses that come back at once


class WorkloadError(RuntimeError):
    """A workload got an answer it should not have (failed store, HTTP error, wrong count)."""


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (linear interpolation between closest ranks)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def url(text: str) -> yarl.URL:
    """Sent as written: Orthanc 1.10's DICOMweb does not percent-decode query values, so `^`
    and `*` go raw to both servers (ours accepts both forms)."""
    return yarl.URL(text, encoded=True)


# ------------------------------------------------------------------------------------ memory
def _status_kb(pid: int, field_name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@dataclass
class PeakMemory:
    """Polls, every `interval` s in a thread, the resident memory of a server process with its
    children (PostgreSQL excluded), and separately the proportional set size (PSS: shared
    buffers counted once) summed over the PostgreSQL processes. Peaks in MB."""

    server_pid: Callable[[], int | None]
    postgres_pids: Callable[[], list[int]]
    interval: float = 0.1
    server_mb: float = 0.0
    postgres_mb: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        pid = self.server_pid()
        if pid:
            tree = [pid, *(p for p in descendants(pid) if not _comm(p).startswith("postgres"))]
            rss = sum(_status_kb(p, "VmRSS") for p in tree)
            peak = max(rss, _status_kb(pid, "VmHWM"))
            self.server_mb = max(self.server_mb, peak / 1024)
        pss = sum(_pss_kb(p) for p in self.postgres_pids())
        self.postgres_mb = max(self.postgres_mb, pss / 1024)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakMemory:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        self.sample()


# ------------------------------------------------------------------------------------- ingest
def storescu(target, files: list[Path], associations: int = 1, timeout: float = 600) -> float:
    """Send `files` with DCMTK's storescu over `associations` concurrent associations (one
    process each, contiguous shares); seconds from the first start to the last exit."""
    program = dcmtk_tool("storescu")
    shares = [files[i * len(files) // associations:(i + 1) * len(files) // associations]
              for i in range(associations)]
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile()) for _ in shares]
        started = time.perf_counter()
        processes = [subprocess.Popen(
            [program, "-aet", CALLING_AET, "-aec", target.aet, "127.0.0.1",
             str(target.dimse_port), *map(str, share)],
            stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env())
            for share, log in zip(shares, logs, strict=True)]
        # A plain wait() returns when the process exits; wait(timeout) polls every 50 ms,
        # which on a one-second run is a 5 % error. The timer kills what runs past the timeout.
        killer = threading.Timer(timeout, lambda: [p.kill() for p in processes])
        killer.start()
        try:
            for process in processes:
                process.wait()
            elapsed = time.perf_counter() - started
        finally:
            killer.cancel()
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        for process, log in zip(processes, logs, strict=True):
            log.seek(0)
            output = log.read().decode(errors="replace")
            if process.returncode != 0 or "Store Failed" in output or "E: " in output:
                raise WorkloadError(f"storescu exited {process.returncode}: {output[-1500:]}")
    return elapsed


def multipart_batches(files: list[Path], size: int = 50) -> list[tuple[str, bytes]]:
    """STOW-RS request bodies of `size` instances each: (Content-Type, body)."""
    batches = []
    for start in range(0, len(files), size):
        boundary = f"ricord-bench-{start:06d}-{os.getpid()}"
        parts = []
        for path in files[start:start + size]:
            parts += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                      path.read_bytes(), b"\r\n"]
        parts.append(f"--{boundary}--\r\n".encode())
        batches.append((f'multipart/related; type="application/dicom"; boundary={boundary}',
                        b"".join(parts)))
    return batches


async def stow(target, batches: list[tuple[str, bytes]], concurrency: int) -> float:
    """POST the batches to /studies from `concurrency` clients; seconds for all of them."""
    queue = list(batches)

    async def client(session: aiohttp.ClientSession) -> None:
        while queue:
            content_type, body = queue.pop(0)
            async with session.post(f"{target.dicomweb}/studies", data=body,
                                    headers={"Content-Type": content_type,
                                             "Accept": "application/dicom+json"}) as answer:
                text = await answer.read()
                if answer.status != 200:
                    raise WorkloadError(f"STOW-RS answered {answer.status}: {text[:500]!r}")

    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        return time.perf_counter() - started


async def get_json(session: aiohttp.ClientSession, address: str) -> list | dict:
    async with session.get(url(address), headers={"Accept": "application/dicom+json"}) as answer:
        if answer.status != 200:
            raise WorkloadError(f"GET {address}: {answer.status} {(await answer.read())[:300]!r}")
        return await answer.json(content_type=None)


def value(item: dict, tag: str, default: object = None) -> object:
    values = item.get(tag, {}).get("Value") or [default]
    return values[0]


async def count_instances(target) -> int:
    """Instances in the archive, from QIDO (NumberOfStudyRelatedInstances per study)."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        studies = await get_json(
            session, f"{target.dicomweb}/studies?limit=1000&includefield=00201208")
    return sum(int(value(s, "00201208", 0)) for s in studies)


# -------------------------------------------------------------------------------------- query
@dataclass
class Latencies:
    ms: list[float]
    seconds: float
    matches: int = 0

    def figures(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_p50": percentile(self.ms, 50), f"{prefix}_p95": percentile(self.ms, 95)}


async def http_latency(paths: list[str], concurrency: int, requests: int, seconds: float,
                       accept: str = "application/dicom+json",
                       check: Callable[[bytes], None] | None = None) -> Latencies:
    """`requests` GETs (cycling over `paths`) from `concurrency` clients, stopping early after
    `seconds`; one untimed warm-up first. Latency of each in ms."""
    latencies: list[float] = []
    issued = 0
    async with aiohttp.ClientSession(
        timeout=TIMEOUT, connector=aiohttp.TCPConnector(limit=concurrency),
        read_bufsize=1 << 20,
    ) as session:
        async def fetch(path: str) -> bytes:
            async with session.get(url(path), headers={"Accept": accept}) as answer:
                body = await answer.read()
                if answer.status != 200:
                    raise WorkloadError(f"GET {path}: {answer.status} {body[:300]!r}")
                return body

        body = await fetch(paths[0])
        if check:
            check(body)
        deadline = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal issued
            while issued < requests and time.perf_counter() < deadline:
                path = paths[issued % len(paths)]
                issued += 1
                started = time.perf_counter()
                await fetch(path)
                latencies.append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return Latencies(latencies, time.perf_counter() - started)


async def qido_count(address: str) -> int:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        return len(await get_json(session, address))


def findscu_latency(target, keys: dict[str, str], repeat: int, seconds: float) -> list[float]:
    """One findscu process per query (association set up and torn down each time); ms."""
    program = dcmtk_tool("findscu")
    args = [program, "-S", "-aet", CALLING_AET, "-aec", target.aet]
    for key, val in {"QueryRetrieveLevel": "STUDY", **keys}.items():
        args += ["-k", f"{key}={val}" if val else key]
    args += ["127.0.0.1", str(target.dimse_port)]
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    for _ in range(repeat):
        if time.perf_counter() > deadline:
            break
        started = time.perf_counter()
        result = subprocess.run(args, capture_output=True, env=dcmtk_env(), timeout=120,
                                check=False)
        latencies.append((time.perf_counter() - started) * 1000)
        if result.returncode != 0:
            raise WorkloadError(f"findscu exited {result.returncode}: {result.stderr[-500:]!r}")
    return latencies


def cfind_association(target, queries: dict[str, dict[str, str]], repeat: int,
                      seconds: float) -> dict[str, tuple[list[float], int]]:
    """C-FINDs over one pynetdicom association (TCP_NODELAY set: pynetdicom never does);
    per query: latencies in ms and the number of matches."""
    ae = AE(ae_title=CALLING_AET)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", target.dimse_port, ae_title=target.aet)
    if not assoc.is_established:
        raise WorkloadError("C-FIND association rejected or aborted")
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    results = {}
    try:
        for name, keys in queries.items():
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "STUDY"
            for key, val in keys.items():
                setattr(identifier, key, val)
            latencies: list[float] = []
            matches = 0
            deadline = time.perf_counter() + seconds
            for _ in range(repeat):
                if time.perf_counter() > deadline:
                    break
                started = time.perf_counter()
                matches = 0
                for status, _identifier in assoc.send_c_find(
                        identifier, StudyRootQueryRetrieveInformationModelFind):
                    if not status or status.Status not in (0x0000, 0xFF00, 0xFF01):
                        raise WorkloadError(f"C-FIND status {status}")
                    if status.Status in (0xFF00, 0xFF01):
                        matches += 1
                latencies.append((time.perf_counter() - started) * 1000)
            results[name] = (latencies, matches)
    finally:
        assoc.release()
    return results


# ------------------------------------------------------------------------------------ retrieve
async def retrieve_series(address: str, accept: str, repeat: int, seconds: float
                          ) -> tuple[list[float], int]:
    """GET a whole series `repeat` times (after an untimed warm-up), reading the body in
    1 MiB chunks without parsing it; MB/s of each and the bytes of one answer."""
    rates, size = [], 0
    async with aiohttp.ClientSession(timeout=TIMEOUT, read_bufsize=1 << 20) as session:
        deadline = time.perf_counter() + seconds
        for n in range(repeat + 1):
            if n > 1 and time.perf_counter() > deadline:
                break
            started = time.perf_counter()
            size = 0
            async with session.get(url(address), headers={"Accept": accept}) as answer:
                if answer.status != 200:
                    raise WorkloadError(f"GET {address}: {answer.status}")
                async for chunk in answer.content.iter_chunked(1 << 20):
                    size += len(chunk)
            if n:   # the first is the warm-up
                rates.append(size / 1e6 / (time.perf_counter() - started))
    return rates, size


async def accepted(address: str, accept: str) -> bool:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session, session.get(
        url(address), headers={"Accept": accept}
    ) as answer:
        await answer.read()
        return answer.status == 200


# ------------------------------------------------------------------------------------ machine
def loopback_throughput(seconds: float = 3.0, limit: int = 16 << 30) -> float:
    """MB/s of Python sendall() of 1 MiB blocks to a reader over one 127.0.0.1 connection."""
    server = socket.create_server(("127.0.0.1", 0))
    received = 0
    done = threading.Event()

    def reader() -> None:
        nonlocal received
        conn, _ = server.accept()
        buffer = bytearray(1 << 20)
        with conn:
            while True:
                n = conn.recv_into(buffer)
                if not n:
                    break
                received += n
        done.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    block = os.urandom(1 << 20)
    with socket.create_connection(server.getsockname()) as sender:
        started = time.perf_counter()
        sent = 0
        while sent < limit and time.perf_counter() - started < seconds:
            sender.sendall(block)
            sent += len(block)
    done.wait(timeout=30)
    elapsed = time.perf_counter() - started
    server.close()
    return received / 1e6 / elapsed


def fsync_rate(contents: Iterable[bytes], folder: Path) -> tuple[float, float]:
    """Write and fsync each content to its own new file (then the folder); files/s and MB/s."""
    folder.mkdir(parents=True, exist_ok=True)
    count = total = 0
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        started = time.perf_counter()
        for n, data in enumerate(contents):
            fd = os.open(os.path.join(tmp, f"{n:06d}.dcm"), os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            count += 1
            total += len(data)
        dir_fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        elapsed = time.perf_counter() - started
    return count / elapsed, total / 1e6 / elapsed


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
