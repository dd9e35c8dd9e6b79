"""Import sessions in the index: which site objects from a PACS's calling AE title belong to
while an import moves studies out of that PACS (studies known by keyed hashes only)."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from ricord_archive.index.database import translating

OUTCOMES = ("stored", "duplicates", "refused", "failed")


@dataclass(frozen=True)
class SessionStudy:
    """An expected study of an active session, and the site its objects are filed under."""

    session_id: int
    study_key: bytes
    site_name: str


@dataclass(frozen=True)
class StudyCounts:
    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    failed: int = 0


class ImportRows:
    """Import sessions in the index, over its pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @translating
    async def open_session(self, site_id: int, calling_aet: str, ttl: float) -> int:
        return await self._pool.fetchval(
            "INSERT INTO import_session (site_id, calling_aet, expires_at) "
            "VALUES ($1, $2, now() + make_interval(secs => $3)) RETURNING id",
            site_id, calling_aet, ttl,
        )

    @translating
    async def expect_studies(
        self, session_id: int, study_keys: list[bytes], ttl: float
    ) -> None:
        """Add expected studies (their counts start again from zero) and renew the session."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE import_session SET expires_at = now() + make_interval(secs => $2) "
                "WHERE id = $1", session_id, ttl,
            )
            await conn.execute(
                "INSERT INTO import_session_study (session_id, study_key) "
                "SELECT $1, unnest($2::bytea[]) ON CONFLICT (session_id, study_key) DO UPDATE "
                "SET stored = 0, duplicates = 0, refused = 0, failed = 0",
                session_id, study_keys,
            )

    @translating
    async def close_session(self, session_id: int) -> None:
        """Remove a session, and any session that has expired."""
        await self._pool.execute(
            "DELETE FROM import_session WHERE id = $1 OR expires_at < now()", session_id
        )

    @translating
    async def importing_aets(self) -> list[str]:
        """The calling AE titles of active sessions."""
        rows = await self._pool.fetch(
            "SELECT DISTINCT calling_aet FROM import_session WHERE expires_at > now()"
        )
        return [r["calling_aet"] for r in rows]

    @translating
    async def session_study(
        self, calling_aet: str, study_key: bytes
    ) -> SessionStudy | None:
        """The most recent active session expecting this study from this calling AE title."""
        row = await self._pool.fetchrow(
            "SELECT s.id, site.name FROM import_session s "
            "JOIN import_session_study st ON st.session_id = s.id "
            "JOIN site ON site.id = s.site_id "
            "WHERE s.calling_aet = $1 AND st.study_key = $2 AND s.expires_at > now() "
            "ORDER BY s.id DESC LIMIT 1",
            calling_aet, study_key,
        )
        return SessionStudy(row["id"], study_key, row["name"]) if row is not None else None

    @translating
    async def count_outcome(self, study: SessionStudy, outcome: str) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        await self._pool.execute(
            f"UPDATE import_session_study SET {outcome} = {outcome} + 1 "  # a fixed column name
            "WHERE session_id = $1 AND study_key = $2",
            study.session_id, study.study_key,
        )

    @translating
    async def study_counts(self, session_id: int, study_key: bytes) -> StudyCounts:
        row = await self._pool.fetchrow(
            "SELECT stored, duplicates, refused, failed FROM import_session_study "
            "WHERE session_id = $1 AND study_key = $2",
            session_id, study_key,
        )
        return StudyCounts(**dict(row)) if row is not None else StudyCounts()
