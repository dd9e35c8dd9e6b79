"""Readiness: whether this server process can serve now (`GET /ready`), as opposed to
liveness (`GET /health`: it runs and has started). Each check names what is wrong, never a
value it read: the database answers, the blob store takes a write, the index's schema is the
one this version migrates to."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable

from ricord_archive.blobstore import BlobStore
from ricord_archive.index.database import Pool
from ricord_archive.index.migrate import load_migrations, schema_difference

CHECK_TIMEOUT = 3.0  # seconds each check may take before it counts as failed
OK = "ok"


class Readiness:
    """The checks of one server process; `started` is false while it starts or stops."""

    def __init__(self, pool: Pool, blobs: BlobStore,
                 started: Callable[[], bool]) -> None:
        self.pool = pool
        self.blobs = blobs
        self.started = started
        self.migrations = load_migrations()

    async def checks(self) -> dict[str, str]:
        """Each check's result: "ok" or what is wrong."""
        database, blob_store = await asyncio.gather(
            _timed(self.pool.fetchval("SELECT 1")),
            _timed(asyncio.to_thread(self.blobs.probe)),
        )
        migrations = "not checked: the database is unreachable"
        if database == OK:
            migrations = await _timed(schema_difference(self.pool, self.migrations))
        return {
            "server": OK if self.started() else "starting or stopping",
            "database": database if database == OK else f"unreachable: {database}",
            "blob_store": blob_store if blob_store == OK else f"not writable: {blob_store}",
            "migrations": migrations,
        }


async def _timed(check: Awaitable[object]) -> str:
    """"ok" when the check returns None or 1, the text it returns otherwise, or the kind of
    failure: the exception's class and, for OS errors, the errno's name (never a message,
    which may quote a path or a value)."""
    try:
        result = await asyncio.wait_for(check, CHECK_TIMEOUT)
    except TimeoutError:
        return f"no answer within {CHECK_TIMEOUT:g} s"
    except OSError as exc:
        code = errno.errorcode.get(exc.errno or 0)
        return f"{type(exc).__name__} ({code})" if code else type(exc).__name__
    except Exception as exc:
        return type(exc).__name__
    return OK if result in (None, 1) else str(result)
