"""Clinical rows in the index (migrations/010): storing a checked, keyed sheet in one
transaction, the columns sites declared, and the row query researchers (and cohorts) use.

For cohorts: `services.clinical.split_filters(pool, site_id, filters)` -> (ClinicalFilter or
None, the other keys); `matching_study_uids(pool, wanted)` -> the de-identified
StudyInstanceUIDs of the studies in the archive whose clinical rows match; `clinical_rows(pool,
wanted, study_uids)` -> one row per examination (optionally only of these studies).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import Any

import asyncpg
import orjson

from ricord_archive.clinical.columns import ACCESSION, BUILT_IN, IDENTIFIERS, STUDY_DATE, Column
from ricord_archive.clinical.export import ClinicalFilter, ColumnFilter
from ricord_archive.clinical.sheet import ExamRow
from ricord_archive.index.database import translating

_BUILT_IN_COLUMNS = tuple(BUILT_IN.values())  # age, sex, test_method, test_result, test_date


class ColumnConflict(ValueError):
    """A column map declares a column the site declared before with another type."""


@dataclass(frozen=True)
class Stored:
    imported: int
    updated: int
    unchanged: int
    named_twice: list[int]  # lines naming an examination another row of the sheet names


async def _declare(conn: asyncpg.Connection, site_id: int, columns: Collection[Column]) -> None:
    for column in columns:
        kind = await conn.fetchval(
            "INSERT INTO clinical_column AS c (site_id, name, kind, unit, allowed) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (site_id, name) DO UPDATE "
            "SET unit = excluded.unit, allowed = excluded.allowed "
            "WHERE c.kind = excluded.kind RETURNING kind",
            site_id, column.name, column.kind, column.unit, list(column.allowed) or None,
        )
        if kind is None:
            raise ColumnConflict(f"column {column.name!r} was declared with another type "
                                 "before; a column keeps its type")


_SET = ("patient_pk", "accession_number", "study_date", *_BUILT_IN_COLUMNS, "extra")


def _upsert(present: frozenset[str], conflict: str) -> str:
    """The upsert of one batch: the columns of the sheet (`present`, index names) are set, the
    others kept; declared columns of the sheet ($12) are replaced in `extra`, the others kept;
    a row whose values do not change is not written."""
    new = [f"excluded.{c}" if c in present else f"r.{c}" for c in _SET[:-1]]
    new.append("(r.extra - $12::text[]) || excluded.extra")
    return f"""
        INSERT INTO clinical_row AS r (site_id, patient_pk, study_uid, accession_number,
            study_date, age, sex, test_method, test_result, test_date, extra)
        SELECT $1, * FROM unnest($2::bigint[], $3::text[], $4::text[], $5::date[],
            $6::smallint[], $7::text[], $8::text[], $9::text[], $10::date[], $11::jsonb[])
        ON CONFLICT {conflict} DO UPDATE
        SET {", ".join(f"{c} = {v}" for c, v in zip(_SET, new, strict=True))}, updated_at = now()
        WHERE ({", ".join(f"r.{c}" for c in _SET)}) IS DISTINCT FROM ({", ".join(new)})
        RETURNING pk, (xmax = 0) AS inserted"""


async def _same_examinations(
    conn: asyncpg.Connection, site_id: int, rows: Sequence[tuple[int, ExamRow]],
) -> tuple[list[tuple[int, ExamRow]], set[int], list[int]]:
    """An examination named by its accession number in one sheet and by its study UID in
    another is one row: a row naming it by accession only updates the row stored under its
    study UID, and a row stored under its accession only takes the study UID a row now gives.
    Returns the rows to store, the rows given their study UID, and the lines of rows that name
    an examination another row of the sheet names too."""
    known = dict(await conn.fetch(
        "SELECT accession_number, study_uid FROM clinical_row WHERE site_id = $1 "
        "AND study_uid IS NOT NULL AND accession_number = ANY($2::text[])",
        site_id, [r.accession for _, r in rows if not r.study_uid],
    ))
    named = {r.study_uid for _, r in rows if r.study_uid}
    keep, twice = [], []
    for patient_pk, row in rows:
        uid = None if row.study_uid else known.get(row.accession)
        if uid in named:
            twice.append(row.line)
        else:
            keep.append((patient_pk, replace(row, study_uid=uid) if uid else row))
    named_both = [(r.study_uid, r.accession) for _, r in keep if r.study_uid and r.accession]
    promoted = await conn.fetch(
        "UPDATE clinical_row c SET study_uid = u.uid, updated_at = now() "
        "FROM unnest($2::text[], $3::text[]) AS u(uid, accession) "
        "WHERE c.site_id = $1 AND c.study_uid IS NULL AND c.accession_number = u.accession "
        "AND NOT EXISTS (SELECT 1 FROM clinical_row x WHERE x.site_id = $1 "
        "AND x.study_uid = u.uid) RETURNING c.pk",
        site_id, [uid for uid, _ in named_both], [accession for _, accession in named_both],
    )
    return keep, {p["pk"] for p in promoted}, twice


def _condition(wanted: ColumnFilter, params: list[Any]) -> str:
    """SQL for one column condition; values go in `params`, never into the text."""
    if wanted.index_column is not None:
        target = f"e.{wanted.index_column}"
    else:
        params.append(wanted.name)
        key = f"${len(params)}"
        target = {"number": f"(e.extra ->> {key})::numeric", "date": f"(e.extra ->> {key})",
                  "boolean": f"(e.extra -> {key})", "category": f"(e.extra ->> {key})"}[
            wanted.kind]
    if wanted.kind in ("number", "date"):
        parts = []
        for bound, operator in ((wanted.low, ">="), (wanted.high, "<=")):
            if bound is None:
                continue
            if wanted.index_column is None and wanted.kind == "date":
                bound = bound.strftime("%Y%m%d")
            params.append(bound)
            parts.append(f"{target} {operator} ${len(params)}")
        return " AND ".join(parts) or "true"
    if wanted.kind == "boolean":
        params.append([orjson.dumps(v).decode() for v in wanted.values])
        return f"{target} = ANY(${len(params)}::jsonb[])"
    params.append(list(wanted.values))
    return f"{target} = ANY(${len(params)}::text[])"


def _where(wanted: ClinicalFilter, study_uids: Collection[str] | None) -> tuple[str, list[Any]]:
    params: list[Any] = []
    conditions = []
    for value, sql in ((wanted.site_id, "e.site_id"), (wanted.pseudonym, "p.pseudonym"),
                       (wanted.study_uid, "e.exam_study_uid")):
        if value is not None:
            params.append(value)
            conditions.append(f"{sql} = ${len(params)}")
    if study_uids is not None:
        params.append(list(study_uids))
        conditions.append(f"e.exam_study_uid = ANY(${len(params)}::text[])")
    conditions += [_condition(c, params) for c in wanted.columns]
    return " AND ".join(conditions) or "true", params


_FROM = ("FROM clinical_exam e JOIN patient p ON p.pk = e.patient_pk "
         "JOIN site si ON si.id = e.site_id")


class ClinicalRows:
    """Clinical columns and rows in the index, over its pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @translating
    async def declared_columns(self, site_id: int | None) -> list[Column]:
        """The columns declared at a site (None: at every site)."""
        rows = await self._pool.fetch(
            "SELECT name, kind, unit, allowed FROM clinical_column "
            "WHERE $1::int IS NULL OR site_id = $1 ORDER BY site_id, name", site_id,
        )
        return [Column(r["name"], r["kind"], r["unit"], tuple(r["allowed"] or ())) for r in rows]

    @translating
    async def declare_columns(self, site_id: int, columns: Collection[Column]) -> None:
        """Record a column map's declarations for a site (a column keeps its kind)."""
        async with self._pool.acquire() as conn, conn.transaction():
            await _declare(conn, site_id, columns)

    @translating
    async def store_rows(
        self, site_id: int, rows: Sequence[tuple[int, ExamRow]],
        present: frozenset[str], declared: Collection[Column],
    ) -> Stored:
        """Store `(patient_pk, row)` pairs of one sheet and its column declarations in one
        transaction. `present`: the sheet's columns (canonical names); the others are left as they
        were."""
        index_present = {BUILT_IN[n] for n in present if n in BUILT_IN} | {"patient_pk"}
        index_present |= {c for n, c in ((ACCESSION, "accession_number"),
                                         (STUDY_DATE, "study_date")) if n in present}
        extra_present = sorted(n for n in present if n not in BUILT_IN and n not in IDENTIFIERS)
        returned: list[asyncpg.Record] = []
        async with self._pool.acquire() as conn, conn.transaction():
            await _declare(conn, site_id, declared)
            keep, promoted, twice = await _same_examinations(conn, site_id, rows)
            for conflict, batch in (
                ("(site_id, study_uid)", [r for r in keep if r[1].study_uid]),
                ("(site_id, accession_number) WHERE study_uid IS NULL",
                 [r for r in keep if not r[1].study_uid]),
            ):
                if not batch:
                    continue
                columns: list[list[Any]] = [[] for _ in range(10)]
                for patient_pk, row in batch:
                    values = [patient_pk, row.study_uid, row.accession, row.study_date,
                              *(row.values.get(c) for c in _BUILT_IN_COLUMNS),
                              orjson.dumps({k: v for k, v in row.extra.items()
                                            if v is not None}).decode()]
                    for column, value in zip(columns, values, strict=True):
                        column.append(value)
                returned += await conn.fetch(_upsert(frozenset(index_present), conflict),
                                             site_id, *columns, extra_present)
        imported = sum(1 for r in returned if r["inserted"])
        updated = len({r["pk"] for r in returned if not r["inserted"]} | promoted)
        return Stored(imported, updated, len(keep) - imported - updated, twice)

    @translating
    async def studies_absent(self, site_id: int, rows: Sequence[ExamRow]) -> int:
        """How many of a sheet's examinations have no study in the archive yet."""
        return await self._pool.fetchval(
            "SELECT count(*) FROM unnest($2::text[], $3::text[]) AS e(uid, accession) "
            "WHERE NOT EXISTS (SELECT 1 FROM study s WHERE s.site_id = $1 AND "
            "(s.study_uid = e.uid OR (e.uid IS NULL AND s.accession_number = e.accession)))",
            site_id, [r.study_uid for r in rows], [r.accession for r in rows],
        )

    @translating
    async def matching_study_uids(self, wanted: ClinicalFilter) -> set[str]:
        """The de-identified StudyInstanceUIDs of the studies in the archive whose clinical rows
        match `wanted`."""
        where, params = _where(wanted, None)
        rows = await self._pool.fetch(
            f"SELECT DISTINCT e.exam_study_uid {_FROM} WHERE e.study_pk IS NOT NULL AND {where}",
            *params,
        )
        return {r[0] for r in rows}

    @translating
    async def clinical_rows(
        self, wanted: ClinicalFilter, study_uids: Collection[str] | None = None,
    ) -> list[dict[str, Any]]:
        """One row per examination matching `wanted` (and, when given, of these de-identified
        studies): SITEID, PatientID (the pseudonym), StudyInstanceUID, AccessionNumber (keyed),
        StudyDate (shifted), the built-in columns, then each declared column that has a value."""
        where, params = _where(wanted, study_uids)
        rows = await self._pool.fetch(
            "SELECT si.siteid, p.pseudonym, e.exam_study_uid, e.exam_accession, "
            "e.exam_study_date, e.age, e.sex, e.test_method, e.test_result, e.test_date, "
            f"e.extra::text AS extra {_FROM} WHERE {where} "
            "ORDER BY si.siteid, p.pseudonym, e.exam_study_date NULLS LAST, e.pk",
            *params,
        )
        names = ("SITEID", "PatientID", "StudyInstanceUID", "AccessionNumber", "StudyDate",
                 *BUILT_IN)
        return [{**dict(zip(names, tuple(r)[:10], strict=True)), **orjson.loads(r["extra"])}
                for r in rows]
