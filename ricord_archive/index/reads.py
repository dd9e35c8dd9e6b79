"""Reads from the index: query answers, the locations and metadata of stored instances, and
the site and patient rows the offline tools look up (never allocating anything)."""

from __future__ import annotations

import contextlib
import re
from dataclasses import fields

import asyncpg

from ricord_archive.deid.keys import PatientKeys
from ricord_archive.index.database import translating
from ricord_archive.index.store import PATIENT_COLUMNS, Patient, Site, patient_entry
from ricord_archive.instances import StoredInstance

# The columns of a StoredInstance, named after its fields: the study's and series' UIDs from
# their tables, the rest from the instance row.
_TABLE_OF = {"study_uid": "st", "series_uid": "se"}
_STORED_COLUMNS = ", ".join(
    f"{_TABLE_OF.get(f.name, 'i')}.{f.name}" for f in fields(StoredInstance)
)
# The instance table is partitioned by study (migrations/014): a retrieval first finds the
# study's pk and partition (`StudyKeys`), then reads that partition alone, the pk bound as a
# parameter (a join on the study UID alone prunes at run time, after planning every partition).
_SCOPE = {
    "study": "i.study_pk = $1",
    "series": "i.study_pk = $1 AND se.series_uid = $2",
    "instance": "i.study_pk = $1 AND i.sop_uid = $3"
                " AND i.series_pk = (SELECT pk FROM series WHERE series_uid = $2)",
}
# A single instance's study and series UIDs, without joining their tables.
_ONE_INSTANCE = {
    "st.study_uid": "(SELECT study_uid FROM study WHERE pk = $1) AS study_uid",
    "se.series_uid": "$2::text AS series_uid",
}
_FROM = (
    "FROM {table} i JOIN series se ON se.pk = i.series_pk JOIN study st ON st.pk = i.study_pk"
)
_ORDER = "ORDER BY se.series_number NULLS LAST, se.pk, i.instance_number NULLS LAST, i.pk"


class StudyKeys:
    """Where each study's instances are, remembered by (Study Instance UID, site): its pk and
    the partition of `instance` holding them (migrations/014), read once per study. A study's
    pk never changes and is never reused, so what is remembered either still holds or names
    no instance (the study went), and is then looked up again. A retrieval then costs one
    statement on one plain table, planned once per connection (a statement on the
    partitioned table is planned again for every study: bench/RESULTS.md)."""

    def __init__(self, size: int = 8192) -> None:
        self._size = size
        self._known: dict[tuple[str, int | None], tuple[int, str]] = {}

    def get(self, study_uid: str, site_id: int | None) -> tuple[int, str] | None:
        """(pk, table) of a study, if remembered."""
        return self._known.get((study_uid, site_id))

    def remember(self, study_uid: str, site_id: int | None, found: tuple[int, str]) -> None:
        if len(self._known) >= self._size:
            self._known.clear()  # simple and rare: each study is looked up again once
        self._known[(study_uid, site_id)] = found

    def forget(self, study_uid: str, site_id: int | None) -> None:
        self._known.pop((study_uid, site_id), None)


# A study's pk, then the partition holding its instances, in two statements: with the pk
# bound, PostgreSQL prunes the second to one partition when planning it and locks only that
# one (one statement with a correlated subquery would lock every partition).
_STUDY_PK = "SELECT pk FROM study WHERE study_uid = $1 AND ($2::integer IS NULL OR site_id = $2)"
_PARTITION = "SELECT tableoid::regclass::text FROM instance WHERE study_pk = $1 LIMIT 1"
_TABLE_NAME = re.compile(r"(?:[a-z_][a-z0-9_]*\.)?instance(?:_p[0-9]+)?")


async def _study_home(conn: asyncpg.Connection, study_uid: str, site_id: int | None
                      ) -> tuple[int, str] | None:
    """(pk, table) of a stored study: the partition holding its instances, or `instance`
    while it has none; None when no such study (of that site)."""
    pk = await conn.fetchval(_STUDY_PK, study_uid, site_id)
    if pk is None:
        return None
    home = await conn.fetchval(_PARTITION, pk) or "instance"
    if not _TABLE_NAME.fullmatch(home):
        raise ValueError("unexpected partition name")
    return pk, home


async def _in_scope(pool: asyncpg.Pool, columns: str, uids: tuple[str, ...],
                    site_id: int | None, keys: StudyKeys) -> list[asyncpg.Record]:
    """`columns` of the instances of a study, a series or one instance (by how many UIDs are
    given), of one site only when `site_id` is given, in retrieval order."""
    async with pool.acquire() as conn:
        remembered = keys.get(uids[0], site_id)
        if remembered is not None:
            pk, home = remembered
            with contextlib.suppress(asyncpg.UndefinedTableError):  # partitioned anew
                rows = await conn.fetch(retrieval_statement(len(uids), columns, home), pk,
                                        *uids[1:])
                if rows:
                    return rows
        found = await _study_home(conn, uids[0], site_id)
        if found is None:
            keys.forget(uids[0], site_id)
            return []
        keys.remember(uids[0], site_id, found)
        if found == remembered:  # the study is there, the scope is empty
            return []
        pk, home = found
        return await conn.fetch(retrieval_statement(len(uids), columns, home), pk, *uids[1:])


def retrieval_statement(depth: int, columns: str = _STORED_COLUMNS,
                        table: str = "instance") -> str:
    """The statement reading `columns` of a study's instances (`depth` 1), a series' (2) or
    one instance (3) from `table` (`instance`, or the partition holding the study); its
    parameters: the study's pk, then the series' and instance's UIDs. One instance is read
    from its table alone, without joining its series and study."""
    if depth == 3:
        one = ", ".join(_ONE_INSTANCE.get(column, column) for column in columns.split(", "))
        return f"SELECT {one} FROM {table} i WHERE {_SCOPE['instance']}"
    scope = _SCOPE[("study", "series")[depth - 1]]
    return f"SELECT {columns} {_FROM.format(table=table)} WHERE {scope} {_ORDER}"


@translating
async def stored_instances(
    pool: asyncpg.Pool, *uids: str, site_id: int | None = None, keys: StudyKeys | None = None,
) -> list[StoredInstance]:
    """The instances of a study, a series or one instance (by how many UIDs are given), of
    one site only when `site_id` is given; study pks remembered in `keys`."""
    rows = await _in_scope(pool, _STORED_COLUMNS, uids, site_id, keys or StudyKeys())
    return [StoredInstance(**dict(r)) for r in rows]


@translating
async def instance_metadata(
    pool: asyncpg.Pool, *uids: str, site_id: int | None = None, keys: StudyKeys | None = None,
) -> list[bytes]:
    """The stored DICOM JSON of each instance in scope (of one site when `site_id` is given),
    in retrieval order; study pks remembered in `keys`."""
    rows = await _in_scope(pool, "i.dicom_json", uids, site_id, keys or StudyKeys())
    return [r["dicom_json"] for r in rows]


@translating
async def site_by_name(pool: asyncpg.Pool, name: str) -> Site | None:
    """The index row of a configured site, or None before the archive first started with it."""
    row = await pool.fetchrow("SELECT id, name, siteid FROM site WHERE name = $1", name)
    return Site(row["id"], row["name"], row["siteid"]) if row is not None else None


@translating
async def study_owner(pool: asyncpg.Pool, study_uid: str) -> tuple[Site, Patient] | None:
    """The site and patient a stored study is filed under, None when the index has no such
    study."""
    row = await pool.fetchrow(
        "SELECT site.id, site.name, site.siteid, p.pk, p.pseudonym, p.date_offset_days "
        "FROM study st JOIN site ON site.id = st.site_id JOIN patient p ON p.pk = st.patient_pk "
        "WHERE st.study_uid = $1",
        study_uid,
    )
    if row is None:
        return None
    return (Site(row["id"], row["name"], row["siteid"]),
            Patient(row["pk"], row["pseudonym"], row["date_offset_days"]))


@translating
async def known_patients(
    pool: asyncpg.Pool, site: Site, wanted: list[PatientKeys]
) -> list[Patient | None]:
    """The patient each of `wanted` names at a site, as `store.patient_for` would find or
    claim it, without allocating or claiming anything; None for a patient the index does not
    know."""
    issuer_keys = [k.key for k in wanted if k.legacy is not None]
    plain_keys = [k.legacy or k.key for k in wanted]
    rows = [patient_entry(r) for r in await pool.fetch(
        f"SELECT {PATIENT_COLUMNS} FROM patient WHERE site_id = $1 "
        "AND (issuer_key = ANY($2::bytea[]) OR patient_key = ANY($3::bytea[]))",
        site.id, issuer_keys, plain_keys,
    )]
    by_issuer_key = {e.issuer_key: e.patient for e in rows if e.issuer_key is not None}
    by_plain_key = {e.patient_key: e for e in rows if e.patient_key is not None}

    def found(keys: PatientKeys) -> Patient | None:
        if keys.legacy is None:
            entry = by_plain_key.get(keys.key)
            return None if entry is None else entry.patient
        if keys.key in by_issuer_key:
            return by_issuer_key[keys.key]
        claimable = by_plain_key.get(keys.legacy)
        return claimable.patient if claimable is not None and claimable.issuer_key is None \
            else None

    return [found(k) for k in wanted]
