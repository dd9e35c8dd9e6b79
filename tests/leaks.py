"""Looking for original values where none may be: every row of the index, the log, every file
of the data directory, and every answer the test collected."""

from __future__ import annotations

import asyncio
import subprocess

import asyncpg

from tests.conftest import Archive


def db_url(archive: Archive) -> str:
    return subprocess.run(archive.command("db-url"), capture_output=True, text=True,
                          timeout=60, check=True).stdout.strip()


def index_text(archive: Archive) -> bytes:
    """Every row of every table of the index as text (a logical dump: dates as text too)."""
    url = db_url(archive)

    async def dump() -> bytes:
        conn = await asyncpg.connect(url)
        try:
            tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = "
                                      "'public'")
            parts = []
            for (table,) in tables:
                rows = await conn.fetch(f'SELECT t::text FROM "{table}" t')
                parts += [r[0].encode() for r in rows]
            return b"\n".join(parts)
        finally:
            await conn.close()

    return asyncio.run(dump())


def leaks(archive: Archive, index: bytes, answers: list[bytes],
          needles: set[bytes]) -> dict[str, set[bytes]]:
    """Stop the archive, then: where each needle was found (nowhere: an empty dict)."""
    assert archive.stop() == 0
    found = {}
    for name, blob in [("index", index), ("log", archive.log_path.read_bytes()),
                       *((str(p), p.read_bytes()) for p in archive.data_dir.rglob("*")
                         if p.is_file() and not p.is_symlink()),
                       *((f"answer {n}", a) for n, a in enumerate(answers))]:
        hits = {n for n in needles if n in blob}
        if hits:
            found[name] = hits
    return found
