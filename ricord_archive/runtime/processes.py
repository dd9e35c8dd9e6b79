"""Several server processes on one machine, sharing the listening ports (SO_REUSEPORT).

Python runs one thread at a time per process, and de-identification is CPU work, so one process
uses one core. The first process (the primary) starts the embedded PostgreSQL, migrates, runs
fsck, and then starts `count - 1` more processes of the same command on the same database; the
kernel spreads new connections (DIMSE associations, HTTP connections) across all of them. They
share nothing but PostgreSQL and the blob store, exactly like archive nodes on several machines.

A worker that dies is started again; SIGTERM to the primary stops the workers gracefully (each
finishes the objects in progress); if the primary itself dies, the kernel sends its workers a
SIGTERM (PR_SET_PDEATHSIG), so no worker outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys

from ricord_archive.runtime import metrics_dir

log = logging.getLogger(__name__)

MAX_PROCESSES = 64
_PR_SET_PDEATHSIG = 1
_RESTART_DELAY_MAX = 30.0


def process_count(configured: int) -> int:
    """The number of server processes: as configured, or with 0 one per CPU (at most 8)."""
    return configured or min(len(os.sched_getaffinity(0)), 8)


def become_worker_of(primary_pid: int) -> None:
    """In a worker: receive SIGTERM when the primary dies, and stop at once if it is gone."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != primary_pid:
        raise SystemExit("the primary server process is gone")


def tell_primary_ready(ready_fd: int) -> None:
    """In a worker: say that it listens (one byte on the pipe its primary gave it)."""
    with contextlib.suppress(OSError):
        os.write(ready_fd, b"1")
        os.close(ready_fd)


class Workers:
    """The primary's worker processes: started, restarted if one dies, stopped on request."""

    def __init__(self, count: int, database_url: str, grace_seconds: float,
                 read_database_url: str | None = None) -> None:
        self.count = count
        self.database_url = database_url
        self.read_database_url = read_database_url
        self.grace = grace_seconds
        self._processes: list[asyncio.subprocess.Process | None] = [None] * count
        self._supervisors: list[asyncio.Task] = []
        self._stopping = False

    def _command(self, ready_fd: int) -> list[str]:
        """This process's own command, as a worker on the primary's database (and its read
        replica, whether configured by file, environment or flag)."""
        replica = ["--read-database-url", self.read_database_url] if self.read_database_url else []
        return [sys.executable, "-m", "ricord_archive", *sys.argv[1:],
                "--database-url", self.database_url, *replica, "--worker-of", str(os.getpid()),
                "--ready-fd", str(ready_fd)]

    async def start(self, timeout: float) -> None:
        """Start the workers and wait (at most `timeout` seconds) until each listens or has
        failed its first start (it is then started again, by its supervisor)."""
        loop = asyncio.get_running_loop()
        first: list[asyncio.Future[bool]] = [loop.create_future() for _ in range(self.count)]
        self._supervisors = [asyncio.create_task(self._supervise(n, first[n]))
                             for n in range(self.count)]
        done, late = await asyncio.wait(first, timeout=timeout)
        failed = len(late) + sum(not future.result() for future in done)
        if failed:
            log.error("%d worker process(es) not listening yet: serving without them for now",
                      failed)

    async def _spawn(self) -> tuple[asyncio.subprocess.Process, bool]:
        """A worker process, and whether it came to listen (else it exited first)."""
        read_end, write_end = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                *self._command(write_end), pass_fds=(write_end,)
            )
        finally:
            os.close(write_end)
        try:
            return process, bool(await asyncio.to_thread(os.read, read_end, 1))
        finally:
            os.close(read_end)

    async def _supervise(self, number: int, first: asyncio.Future[bool]) -> None:
        delay = 1.0
        while not self._stopping:
            process, listening = await self._spawn()
            self._processes[number] = process
            if not first.done():
                first.set_result(listening)
            if listening:
                log.info("worker process %d started (pid %d)", number + 1, process.pid)
            started = asyncio.get_running_loop().time()
            try:
                code = await process.wait()
            except asyncio.CancelledError:  # stopped while this one was starting: no orphan
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                raise
            metrics_dir.mark_dead(process.pid)
            if self._stopping:
                return
            log.error("worker process %d exited with code %s; starting it again in %.0f s",
                      number + 1, code, delay)
            await asyncio.sleep(delay)
            ran = asyncio.get_running_loop().time() - started
            delay = 1.0 if ran > 60 else min(delay * 2, _RESTART_DELAY_MAX)

    async def stop(self) -> None:
        """SIGTERM every worker, wait for them (their grace period, and a little more), then
        kill what is left."""
        self._stopping = True
        running = [p for p in self._processes if p is not None and p.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        if running:
            await asyncio.wait([asyncio.create_task(p.wait()) for p in running],
                                         timeout=self.grace + 15)
            for process in running:
                if process.returncode is None:
                    log.warning("worker process %d did not stop in time: killed", process.pid)
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    await process.wait()
        for task in self._supervisors:
            task.cancel()
        await asyncio.gather(*self._supervisors, return_exceptions=True)
