"""Plain numbered SQL migrations, applied in order under an advisory lock.

Each applied file is recorded with its SHA-256; a changed applied file stops start-up.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import asyncpg

log = logging.getLogger(__name__)

_LOCK_ID = 0x52_49_43_4F_52_44  # "RICORD"
_NAME = re.compile(r"^(\d{3,})_[a-z0-9_]+\.sql$")


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


def migrations_dir() -> Path:
    """`ricord_archive/migrations` in an installed wheel, the repository's `migrations/` else."""
    packaged = Path(str(resources.files("ricord_archive"))) / "migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "migrations"


def load_migrations(directory: Path | None = None) -> list[Migration]:
    directory = directory or migrations_dir()
    found = []
    for path in sorted(directory.iterdir()):
        match = _NAME.match(path.name)
        if match:
            found.append(Migration(int(match.group(1)), path.name, path.read_text("utf-8")))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migrations share a number in {directory}")
    return found


async def migrate(conn: asyncpg.Connection, migrations: list[Migration] | None = None, *,
                  instance_partitions: int | None = None) -> int:
    """Apply what is missing; return how many migrations were applied. `instance_partitions`:
    how many partitions the instance table gets when a migration creates it (migrations/014;
    its own default when None); an index created with another count keeps its own."""
    migrations = load_migrations() if migrations is None else migrations
    if instance_partitions is not None:
        await conn.execute("SELECT set_config('ricord.instance_partitions', $1, false)",
                           str(instance_partitions))
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migration (
                   version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        applied = {
            r["version"]: r for r in await conn.fetch("SELECT * FROM schema_migration")
        }
        count = 0
        for migration in migrations:
            done = applied.get(migration.version)
            if done is not None:
                if done["checksum"] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.name} was changed after it was applied "
                        f"(checksum {done['checksum'][:12]} in the database, "
                        f"{migration.checksum[:12]} on disk): restore the file and add a new "
                        "migration instead"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migration (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version, migration.name, migration.checksum,
                )
            log.info("applied migration %s", migration.name)
            count += 1
        return count
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)


async def instance_partitions(conn: asyncpg.Connection) -> int | None:
    """How many partitions the index's instance table has; None before migrations/014."""
    return await conn.fetchval(
        "SELECT (SELECT count(*) FROM pg_inherits WHERE inhparent = p.partrelid) "
        "FROM pg_partitioned_table p WHERE p.partrelid = to_regclass('instance')"
    )


async def check_partitions(conn: asyncpg.Connection, configured: int) -> None:
    """Warn when the index has another number of instance partitions than `configured`."""
    actual = await instance_partitions(conn)
    if actual is not None and actual != configured:
        log.warning("instance_partitions = %d is configured, but the index was created with "
                    "%d instance partitions, which it keeps: the setting applies only when the "
                    "index is created", configured, actual)


async def schema_difference(pool: asyncpg.Pool, migrations: list[Migration]) -> str | None:
    """None when the index holds exactly `migrations` (as applied, unchanged); else what
    differs, in words: missing, unknown to this version (a newer archive migrated it), or
    changed since they were applied."""
    applied = {
        r["version"]: r["checksum"]
        for r in await pool.fetch("SELECT version, checksum FROM schema_migration")
    }
    known = {m.version: m.checksum for m in migrations}
    problems = []
    for label, versions in (
        ("not applied", sorted(known.keys() - applied.keys())),
        ("applied but unknown to this version", sorted(applied.keys() - known.keys())),
        ("changed since applied", sorted(v for v in known.keys() & applied.keys()
                                         if known[v] != applied[v])),
    ):
        if versions:
            problems.append(f"{label}: {', '.join(str(v) for v in versions)}")
    return "; ".join(problems) or None
