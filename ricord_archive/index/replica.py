"""Reads that may go to a read replica (a PostgreSQL hot standby) instead of the primary.

Only queries (QIDO-RS, C-FIND) and stored metadata (WADO-RS /metadata) go there; ingest,
allocations, imports, fsck and the lookups behind byte retrieval stay on the primary.

The replica is a convenience, never a dependency: when it cannot be reached (at start-up or
later), reads go to the primary, and a background probe sends them back to the replica once
it answers again. Each change of state is logged once, with the replica's host and port and
the kind of error only. A replica that was promoted (now read-write) is used as before.
A replica lags behind the primary: what was just stored may not be visible there yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlsplit

import asyncpg

from ricord_archive.errors import IndexFailure
from ricord_archive.index.database import DATABASE_UNAVAILABLE, keep_session
from ricord_archive.runtime import metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

PROBE_INTERVAL = 2.0  # seconds between attempts to reach an unavailable replica
STARTUP_CATCH_UP = 5.0  # seconds start-up waits for the replica to replay the migrations
CONNECT_TIMEOUT = 5.0  # seconds to open a connection to the replica
QUERY_TIMEOUT = 60.0  # seconds a statement may run on the replica
# The replica cannot serve: unreachable, shutting down under a query in progress, refusing
# the connection (authentication, no such database, too many connections).
_GONE = (
    *DATABASE_UNAVAILABLE, asyncpg.AdminShutdownError, asyncpg.CrashShutdownError,
    asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidCatalogNameError,
    asyncpg.TooManyConnectionsError,
)
# A hot standby cancels a query that conflicts with the WAL it replays (SQLSTATE 40001):
# such a read is answered by the primary instead.
_REPLAY_CONFLICT = asyncpg.SerializationError


class _ReplicaNotReady(Exception):
    """The replica answers but does not hold the archive's index (yet): older schema, or
    another database."""


class Reads:
    """Where reads go: `run(operation)` calls `operation(pool)` with the replica's pool when
    the replica is available, else (or when it fails to answer) with the primary's."""

    def __init__(self, primary: asyncpg.Pool, replica_url: str | None = None) -> None:
        self.primary = primary
        self.replica_url = replica_url
        self._replica: asyncpg.Pool | None = None
        self._available = False
        self._probe: asyncio.Task | None = None
        self._closed = False

    async def start(self) -> None:
        """Try the replica once; when it cannot be reached, start on the primary and keep
        probing. Never fails because of the replica."""
        if self.replica_url is None:
            return
        self._replica = await asyncpg.create_pool(
            self.replica_url, min_size=0, max_size=10, command_timeout=QUERY_TIMEOUT,
            timeout=CONNECT_TIMEOUT, reset=keep_session,
            server_settings={"application_name": f"ricord-archive reads {os.getpid()}"},
        )
        deadline = asyncio.get_running_loop().time() + STARTUP_CATCH_UP
        while True:
            try:
                await self._check()
            except _ReplicaNotReady as exc:
                if asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.1)  # migrations just applied on the primary
                    continue
                self._fall_back(exc)
            except _GONE as exc:
                self._fall_back(exc)
            else:
                self._available = True
                log.info("reads (queries, metadata) go to the read replica at %s", self._where())
            return

    async def close(self) -> None:
        self._closed = True
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        if self._replica is not None:
            await _close(self._replica)

    @property
    def on_replica(self) -> bool:
        """Whether reads go to the replica now."""
        return self._available and self._replica is not None

    async def run(self, operation: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
        if self._available and self._replica is not None:
            try:
                return await operation(self._replica)
            except (IndexFailure, *_GONE, _REPLAY_CONFLICT) as exc:
                # the driver's error, whether `operation` translated it (`translating`) or not
                cause = exc.__cause__ if isinstance(exc, IndexFailure) else exc
                if isinstance(cause, _GONE):
                    self._fall_back(cause)
                elif not isinstance(cause, _REPLAY_CONFLICT):
                    raise
                # else a replay conflict: this one read only is answered by the primary
        return await operation(self.primary)

    def _where(self) -> str:
        """The replica's host and port, for logs (never its user or password)."""
        parts = urlsplit(self.replica_url or "")
        try:
            port = parts.port
        except ValueError:
            port = None
        return f"{parts.hostname or 'localhost'}:{port or 5432}"

    def _fall_back(self, exc: BaseException) -> None:
        """Reads go to the primary until the probe reaches the replica again."""
        if self._closed:
            return
        if self._available or self._probe is None:
            metrics.REPLICA_FALLBACKS.inc()
            log.warning(
                "read replica at %s unavailable (%s): reads go to the primary until it is back",
                self._where(), type(exc).__name__,
            )
        self._available = False
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._probe_until_back())

    async def _probe_until_back(self) -> None:
        while not self._closed:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                await self._check()
            except (*_GONE, _ReplicaNotReady):
                continue
            self._available = True
            log.info("read replica at %s is back: reads go to it again", self._where())
            return

    async def _check(self) -> None:
        """The replica answers and holds the index at the primary's schema version."""
        assert self._replica is not None
        try:
            theirs = await self._replica.fetchval(
                "SELECT max(version) FROM schema_migration"
            )
        except asyncpg.UndefinedTableError:
            theirs = None
        try:
            ours = await self.primary.fetchval("SELECT max(version) FROM schema_migration")
        except _GONE:
            ours = None  # the primary is away (being replaced?): the replica will do
        if theirs is None or (ours is not None and theirs < ours):
            raise _ReplicaNotReady


async def _close(pool: asyncpg.Pool) -> None:
    try:
        await asyncio.wait_for(pool.close(), timeout=10)
    except _GONE:  # includes the timeout
        pool.terminate()


@contextlib.asynccontextmanager
async def reads(primary: asyncpg.Pool, replica_url: str | None) -> AsyncIterator[Reads]:
    """Reads on the replica at `replica_url` (None: on the primary) for the duration."""
    chosen = Reads(primary, replica_url)
    await chosen.start()
    try:
        yield chosen
    finally:
        await chosen.close()
