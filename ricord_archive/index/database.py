"""Connecting to PostgreSQL: the embedded cluster or a configured server."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ParamSpec, TypeAlias, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from ricord_archive.errors import IndexFailure, IndexUnavailable, StorageUnavailable
from ricord_archive.runtime import metrics

log = logging.getLogger(__name__)


# What a lost or unreachable database raises: connection errors, not query errors.
DATABASE_UNAVAILABLE = (
    asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError,
    OSError, asyncio.TimeoutError,
)
P = ParamSpec("P")
T = TypeVar("T")

# The index's handles, as the services and tools see them (only `index/` uses their methods'
# SQL; the others pass them through to `index/` functions).
Pool: TypeAlias = asyncpg.Pool
Connection: TypeAlias = asyncpg.Connection


@contextlib.asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """The driver's failures as the index's own (errors.IndexUnavailable for a lost or
    unreachable database, IndexFailure for a refused statement), so that no module outside
    `index/` names asyncpg or its exceptions. Only around database work: an OSError of
    anything else (a blob write) must stay what it is."""
    try:
        yield
    except _DRIVER_ERRORS as exc:
        raise _index_error(exc) from exc


_DRIVER_ERRORS = (*DATABASE_UNAVAILABLE, asyncpg.PostgresError)


def _index_error(exc: BaseException) -> IndexFailure:
    """The index's own error for a driver failure: IndexUnavailable for a lost or unreachable
    database, IndexFailure for a refused statement (its class named, never its text)."""
    if isinstance(exc, DATABASE_UNAVAILABLE):
        return IndexUnavailable(f"the index is unavailable ({type(exc).__name__})")
    return IndexFailure(f"the index refused a statement ({type(exc).__name__})")


def translating(function: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """`translated` around every call of an index function (a plain try: no context manager
    object per call)."""

    @functools.wraps(function)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await function(*args, **kwargs)
        except _DRIVER_ERRORS as exc:
            raise _index_error(exc) from exc

    return call


@contextlib.asynccontextmanager
async def reporting_outages() -> AsyncIterator[None]:
    """Turn a lost database into StorageUnavailable (503, C-STORE 0xA700) for the caller
    (every `index/` function raises IndexUnavailable for it, never the driver's errors)."""
    try:
        yield
    except IndexUnavailable as exc:
        raise StorageUnavailable("the index is unavailable; try again later") from exc


async def ensure_database(url: str) -> None:
    """Create the URL's database if it does not exist (embedded cluster's first start)."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin_url = urlunsplit(parts._replace(path="/postgres"))
    conn = await asyncpg.connect(admin_url)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            # identifiers cannot be parameters; the name comes from our own constant
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def keep_session(conn: asyncpg.Connection) -> None:
    """A pooled connection's reset: nothing to send. The archive sets no session state (no
    SET, LISTEN or cursors outside a transaction) and its two advisory locks (migrations, the
    orphan collector) are released by their holders; an open transaction is still rolled back
    by asyncpg itself. asyncpg's default reset costs a round trip every time a connection goes
    back to the pool, once per stored instance."""


class MeteredPool(asyncpg.Pool):
    """asyncpg's pool, counting the requests for a connection that had to wait for one (none
    idle, all opened) and how long they waited (`ricord_db_pool_waits_total`)."""

    async def _acquire(self, timeout: float | None) -> Any:
        if self._queue is None or not self._queue.empty():
            return await super()._acquire(timeout)
        started = time.perf_counter()
        try:
            return await super()._acquire(timeout)
        finally:
            metrics.DB_POOL_WAITS.inc()
            metrics.DB_POOL_WAIT_SECONDS.observe(time.perf_counter() - started)


async def create_pool(url: str, attempts: int = 20, max_size: int = 10) -> asyncpg.Pool:
    """A connection pool of at most `max_size` connections, retried while the server is still
    coming up."""
    delay = 0.1
    for attempt in range(attempts):
        try:
            return await MeteredPool(  # asyncpg.create_pool's defaults, but for the sizes
                url, min_size=1, max_size=max_size, max_queries=50_000,
                max_inactive_connection_lifetime=300.0, loop=None,
                connection_class=asyncpg.Connection, record_class=asyncpg.Record,
                command_timeout=60, reset=keep_session,
            )
        except (OSError, asyncpg.CannotConnectNowError) as exc:
            if attempt == attempts - 1:
                raise
            log.info("database not ready (%s); retrying", type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")
