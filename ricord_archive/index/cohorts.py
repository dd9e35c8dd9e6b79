"""Cohorts in the index (migrations/011): freezing what a query matches, reading it back."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from ricord_archive.index.database import translating
from ricord_archive.index.query_sql import matches_sql
from ricord_archive.search.model import Query


@dataclass(frozen=True)
class CohortFile:
    """One object of a cohort, in archive order."""

    instance_pk: int
    series_pk: int
    study_pk: int
    pseudonym: str
    study_uid: str
    series_uid: str
    blob_key: str
    size_bytes: int
    sha256: bytes
    crc32: int | None  # None until computed (a blob no earlier cohort held)


@dataclass(frozen=True)
class SeriesRecord:
    """What metadata.csv tells of a series: its stored study, series and first instance JSON."""

    series_pk: int
    study_json: dict[str, Any]
    series_json: dict[str, Any]
    instance_json: dict[str, Any]
    sop_class_uid: str


@dataclass(frozen=True)
class NewCohort:
    name: str
    description: str
    license: str
    citation: str
    filters: dict[str, str]
    site_id: int | None
    created_by: str | None


@dataclass(frozen=True, kw_only=True)
class Cohort(NewCohort):
    """A frozen cohort: what it was created with, its id, counts and size."""

    id: int
    num_studies: int
    num_series: int
    num_instances: int
    size_bytes: int
    created_at: dt.datetime


_FILE_COLUMNS = (
    "i.pk AS instance_pk, se.pk AS series_pk, st.pk AS study_pk, p.pseudonym, st.study_uid, "
    "se.series_uid"
)
_ARCHIVE_ORDER = (
    "p.pseudonym, st.pk, se.series_number NULLS LAST, se.pk, i.instance_number NULLS LAST, i.pk"
)


_COHORT_COLUMNS = (
    "id, name, description, license, citation, filters, site_id, created_by, num_studies, "
    "num_series, num_instances, size_bytes, created_at"
)


# A frozen object's instance row; $2: the cohort's studies, bound so that only their
# partitions are planned (migrations/014).
_FROZEN_INSTANCE = (
    "JOIN instance i ON i.study_pk = c.study_pk AND i.pk = c.instance_pk "
    "AND i.study_pk = ANY($2::bigint[])"
)


def _distinct(pks: Iterable[int]) -> list[int]:
    return list(dict.fromkeys(pks))


async def _cohort_studies(conn: asyncpg.Connection, cohort_id: int) -> list[int]:
    """The pks of the studies a cohort's frozen objects belong to."""
    return await conn.fetchval(
        "SELECT coalesce(array_agg(DISTINCT study_pk), '{}') FROM cohort_instance "
        "WHERE cohort_id = $1", cohort_id,
    )


def _cohort(row: asyncpg.Record) -> Cohort:
    return Cohort(**{**dict(row), "filters": orjson.loads(row["filters"])})


class CohortRows:
    """Cohorts in the index, over its pool: frozen series and objects, their texts."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @translating
    async def matching_files(self, query: Query) -> list[CohortFile]:
        """The instances of every series the (series-level) query matches now, in archive order:
        by subject, study, series and instance number; CRC-32s known from earlier cohorts."""
        matched, values = matches_sql(query)
        async with self._pool.acquire() as conn:
            series = await conn.fetch(
                f"WITH matched AS ({matched}) SELECT se.pk, se.study_pk "
                "FROM matched m JOIN series se ON se.pk = m.pk", *values,
            )
            # the studies bound as a parameter: only their partitions are planned (migrations/014)
            rows = await conn.fetch(
                f"SELECT {_FILE_COLUMNS}, i.blob_key, i.size_bytes, i.sha256, "
                "(SELECT c.crc32 FROM cohort_instance c WHERE c.blob_key = i.blob_key "
                "LIMIT 1) AS crc32 "
                "FROM instance i JOIN series se ON se.pk = i.series_pk "
                "JOIN study st ON st.pk = i.study_pk JOIN patient p ON p.pk = st.patient_pk "
                "WHERE i.study_pk = ANY($1::bigint[]) AND i.series_pk = ANY($2::bigint[]) "
                f"ORDER BY {_ARCHIVE_ORDER}",
                _distinct(r["study_pk"] for r in series), [r["pk"] for r in series],
            )
        return [CohortFile(**dict(r)) for r in rows]

    @translating
    async def series_records(self, firsts: Sequence[CohortFile]) -> list[SeriesRecord]:
        """The stored documents of each given instance's series and study with its own, in
        order."""
        rows = await self._pool.fetch(
            "SELECT u.series_pk, st.dicom_json AS study_json, se.dicom_json AS series_json, "
            "i.dicom_json AS instance_json, i.sop_class_uid "
            "FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) "
            "WITH ORDINALITY AS u(series_pk, study_pk, instance_pk, n) "
            "JOIN series se ON se.pk = u.series_pk JOIN study st ON st.pk = se.study_pk "
            "JOIN instance i ON i.study_pk = u.study_pk AND i.pk = u.instance_pk "
            "WHERE i.study_pk = ANY($4::bigint[]) ORDER BY u.n",
            [f.series_pk for f in firsts], [f.study_pk for f in firsts],
            [f.instance_pk for f in firsts], _distinct(f.study_pk for f in firsts),
        )
        return [
            SeriesRecord(r["series_pk"], orjson.loads(r["study_json"]),
                         orjson.loads(r["series_json"]), orjson.loads(r["instance_json"]),
                         r["sop_class_uid"])
            for r in rows
        ]

    @translating
    async def insert_cohort(
        self, cohort: NewCohort, files: Sequence[CohortFile], crcs: Sequence[int],
        metadata_csv: bytes, clinical_csv: bytes,
    ) -> int:
        """Store the frozen cohort in one transaction; its id."""
        series = list(dict.fromkeys(f.series_pk for f in files))
        async with self._pool.acquire() as conn, conn.transaction():
            cohort_id = await conn.fetchval(
                "INSERT INTO cohort (name, description, license, citation, filters, site_id, "
                "created_by, num_studies, num_series, num_instances, size_bytes, metadata_csv, "
                "clinical_csv) VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9, $10, $11, $12, "
                "$13) RETURNING id",
                cohort.name, cohort.description, cohort.license, cohort.citation,
                orjson.dumps(cohort.filters).decode(), cohort.site_id, cohort.created_by,
                len({f.study_pk for f in files}), len(series), len(files),
                sum(f.size_bytes for f in files), metadata_csv, clinical_csv,
            )
            await conn.copy_records_to_table(
                "cohort_series", columns=("cohort_id", "position", "series_pk"),
                records=[(cohort_id, n, pk) for n, pk in enumerate(series)],
            )
            await conn.copy_records_to_table(
                "cohort_instance",
                columns=("cohort_id", "position", "study_pk", "instance_pk", "blob_key",
                         "size_bytes", "sha256", "crc32"),
                records=[
                    (cohort_id, n, f.study_pk, f.instance_pk, f.blob_key, f.size_bytes,
                     f.sha256, crc)
                    for n, (f, crc) in enumerate(zip(files, crcs, strict=True))
                ],
            )
        return cohort_id

    @translating
    async def list_cohorts(self, site_id: int | None) -> list[Cohort]:
        """Every cohort, or only those of one site when `site_id` is given."""
        rows = await self._pool.fetch(
            f"SELECT {_COHORT_COLUMNS} FROM cohort WHERE $1::integer IS NULL OR site_id = $1 "
            "ORDER BY id", site_id,
        )
        return [_cohort(r) for r in rows]

    @translating
    async def get_cohort(self, cohort_id: int, site_id: int | None) -> Cohort | None:
        row = await self._pool.fetchrow(
            f"SELECT {_COHORT_COLUMNS} FROM cohort WHERE id = $1 "
            "AND ($2::integer IS NULL OR site_id = $2)", cohort_id, site_id,
        )
        return _cohort(row) if row is not None else None

    @translating
    async def cohort_texts(self, cohort_id: int) -> tuple[bytes, bytes]:
        """(metadata.csv, clinical.csv) as frozen."""
        row = await self._pool.fetchrow(
            "SELECT metadata_csv, clinical_csv FROM cohort WHERE id = $1", cohort_id
        )
        return bytes(row["metadata_csv"]), bytes(row["clinical_csv"])

    @translating
    async def cohort_files(self, cohort_id: int) -> list[CohortFile]:
        """The frozen objects of a cohort, in archive order."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_FILE_COLUMNS}, c.blob_key, c.size_bytes, c.sha256, c.crc32 "
                f"FROM cohort_instance c {_FROZEN_INSTANCE} "
                "JOIN series se ON se.pk = i.series_pk JOIN study st ON st.pk = se.study_pk "
                "JOIN patient p ON p.pk = st.patient_pk WHERE c.cohort_id = $1 "
                "ORDER BY c.position",
                cohort_id, await _cohort_studies(conn, cohort_id),
            )
        return [CohortFile(**dict(r)) for r in rows]

    @translating
    async def cohort_series_uids(self, cohort_id: int) -> list[str]:
        rows = await self._pool.fetch(
            "SELECT se.series_uid FROM cohort_series c JOIN series se ON se.pk = c.series_pk "
            "WHERE c.cohort_id = $1 ORDER BY c.position", cohort_id,
        )
        return [r["series_uid"] for r in rows]

    @translating
    async def delete_cohort(self, cohort_id: int) -> bool:
        deleted = await self._pool.fetchval(
            "DELETE FROM cohort WHERE id = $1 RETURNING id", cohort_id)
        return deleted is not None

    @translating
    async def subjects(self, study_uids: Sequence[str]) -> dict[str, str]:
        """The pseudonym of each study's patient, by study UID."""
        rows = await self._pool.fetch(
            "SELECT st.study_uid, p.pseudonym FROM study st JOIN patient p ON p.pk = st.patient_pk "
            "WHERE st.study_uid = ANY($1::text[])", list(study_uids),
        )
        return {r["study_uid"]: r["pseudonym"] for r in rows}

    @translating
    async def replaced_files(self, cohort_id: int) -> int:
        """How many of a cohort's objects were replaced since it was frozen (an `overwrite`
        duplicate policy stores the new object under a new blob and deletes the old one)."""
        async with self._pool.acquire() as conn:
            return await conn.fetchval(
                f"SELECT count(*) FROM cohort_instance c {_FROZEN_INSTANCE} "
                "WHERE c.cohort_id = $1 AND i.blob_key <> c.blob_key",
                cohort_id, await _cohort_studies(conn, cohort_id),
            )
