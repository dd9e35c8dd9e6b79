"""The index's side of the blob store check (`fsck`): every instance's blob, and a lock one
node at a time takes across every process sharing the index."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg

from ricord_archive.index.database import translated


async def instance_blobs(pool: asyncpg.Pool) -> AsyncIterator[tuple[str, str, int]]:
    """(SOP Instance UID, blob key, size) of every indexed instance, in one transaction."""
    async with translated(), pool.acquire() as conn, conn.transaction():
        async for row in conn.cursor("SELECT sop_uid, blob_key, size_bytes FROM instance"):
            yield row["sop_uid"], row["blob_key"], row["size_bytes"]


@contextlib.asynccontextmanager
async def advisory_lock(pool: asyncpg.Pool, key: int) -> AsyncIterator[bool]:
    """Whether this process took the session advisory lock `key` (held until the block
    ends); False when another holds it."""
    async with translated(), pool.acquire() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
            yield False
            return
        try:
            yield True
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", key)
