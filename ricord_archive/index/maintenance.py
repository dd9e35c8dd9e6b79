"""The index's side of the blob store check (`fsck`): every instance's blob, and a lock one
node at a time takes across every process sharing the index."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg

from ricord_archive.index.database import translated, translating
from ricord_archive.index.store import Patient, Site


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


@translating
async def is_empty(pool: asyncpg.Pool) -> bool:
    """Whether the index holds no instance."""
    return not await pool.fetchval("SELECT EXISTS (SELECT 1 FROM instance)")


@translating
async def restore_patient(pool: asyncpg.Pool, site: Site, pseudonym: str, offset: int,
                          key: bytes | None, issuer_key: bytes | None = None) -> Patient:
    """Index a patient as its allocation record has it (rebuilding the index); the site's
    next patient number stays past the pseudonym's."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "INSERT INTO patient (site_id, patient_key, issuer_key, pseudonym, "
            "date_offset_days) VALUES ($1, $2, $3, $4, $5) RETURNING pk",
            site.id, key, issuer_key, pseudonym, offset)
        tail = pseudonym.rsplit("-", 1)[-1]
        number = int(tail) if tail.isdigit() else 0
        await conn.execute("UPDATE site SET next_patient_number = "
                           "greatest(next_patient_number, $2) WHERE id = $1", site.id, number + 1)
    return Patient(row["pk"], pseudonym, offset)
