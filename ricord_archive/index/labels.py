"""Labels and annotations in the index (migrations/013): the schema and the readers'
annotations stored in one transaction (an id already stored is updated only when it changed),
the archive's UIDs an annotation may name, and the reads (filters, consensus, cohorts)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from ricord_archive.index.database import translating
from ricord_archive.labels.model import (
    Annotation,
    AnnotationMode,
    Code,
    Label,
    LabelGroup,
    LabelType,
    Scope,
)


@dataclass(frozen=True)
class Counts:
    imported: int = 0
    updated: int = 0
    unchanged: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"imported": self.imported, "updated": self.updated,
                "unchanged": self.unchanged}


@dataclass(frozen=True)
class AnnotationFilter:
    """What GET /api/annotations may filter on; `label` and `group` match an id or a name."""

    study_uid: str | None = None
    series_uid: str | None = None
    label: str | None = None
    group: str | None = None
    reader: str | None = None


def _counts(rows: Sequence[asyncpg.Record], total: int) -> Counts:
    imported = sum(1 for r in rows if r["inserted"])
    updated = len(rows) - imported
    return Counts(imported, updated, total - imported - updated)


async def _store_groups(conn: asyncpg.Connection, groups: Sequence[LabelGroup]) -> None:
    await conn.execute(
        "INSERT INTO label_group AS g (id, name) SELECT * FROM unnest($1::text[], $2::text[]) "
        "ON CONFLICT (id) DO UPDATE SET name = excluded.name WHERE g.name <> excluded.name",
        [g.id for g in groups], [g.name for g in groups],
    )


_LABEL_COLUMNS = ("name", "group_id", "scope", "type", "annotation_mode", "colour", "parent_id",
                  "code_scheme", "code_value", "code_meaning")


async def _store_labels(conn: asyncpg.Connection, labels: Sequence[Label]) -> Counts:
    columns = ", ".join(_LABEL_COLUMNS)
    rows = await conn.fetch(
        f"INSERT INTO label AS l (id, {columns}) SELECT * FROM unnest($1::text[], $2::text[], "
        "$3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], "
        "$10::text[], $11::text[]) ON CONFLICT (id) DO UPDATE SET "
        + ", ".join(f"{c} = excluded.{c}" for c in _LABEL_COLUMNS)
        + f" WHERE ({', '.join(f'l.{c}' for c in _LABEL_COLUMNS)}) IS DISTINCT FROM "
        f"({', '.join(f'excluded.{c}' for c in _LABEL_COLUMNS)}) "
        "RETURNING (xmax = 0) AS inserted",
        [lb.id for lb in labels], [lb.name for lb in labels], [lb.group_id for lb in labels],
        [lb.scope.value for lb in labels], [lb.type.value for lb in labels],
        [lb.mode.value if lb.mode else None for lb in labels], [lb.colour for lb in labels],
        [lb.parent_id for lb in labels], [lb.code.scheme for lb in labels],
        [lb.code.value for lb in labels], [lb.code.meaning for lb in labels],
    )
    return _counts(rows, len(labels))


_ANNOTATION_COLUMNS = ("label_id", "study_uid", "series_uid", "sop_uid", "frame", "reader",
                       "geometry", "note", "created_at", "updated_at")


def _label(row: asyncpg.Record) -> Label:
    mode = row["annotation_mode"]
    return Label(row["id"], row["name"], row["group_id"], Scope(row["scope"]),
                 LabelType(row["type"]), AnnotationMode(mode) if mode else None, row["colour"],
                 row["parent_id"], Code(row["code_scheme"], row["code_value"],
                                        row["code_meaning"]))


def _where(wanted: AnnotationFilter) -> tuple[str, list[Any]]:
    params: list[Any] = []
    conditions = []
    for value, sql in ((wanted.study_uid, "a.study_uid = {}"),
                       (wanted.series_uid, "a.series_uid = {}"),
                       (wanted.reader, "a.reader = {}"),
                       (wanted.label, "(l.id = {0} OR l.name = {0})"),
                       (wanted.group, "(g.id = {0} OR g.name = {0})")):
        if value is not None:
            params.append(value)
            conditions.append(sql.format(f"${len(params)}"))
    return " AND ".join(conditions) or "true", params


_FROM = ("FROM annotation a JOIN label l ON l.id = a.label_id "
         "JOIN label_group g ON g.id = l.group_id")


class LabelRows:
    """Label schemas and expert annotations in the index, over its pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @translating
    async def store_schema(self, groups: Sequence[LabelGroup],
                           labels: Sequence[Label]) -> Counts:
        """Store label groups and labels in one transaction; counts of labels."""
        async with self._pool.acquire() as conn, conn.transaction():
            await _store_groups(conn, groups)
            return await _store_labels(conn, labels)

    @translating
    async def store(
        self, groups: Sequence[LabelGroup], labels: Sequence[Label],
        annotations: Sequence[Annotation], keep_notes: bool,
    ) -> tuple[Counts, Counts]:
        """Store a file's schema and annotations in one transaction; (label, annotation) counts.
        Without `keep_notes` a stored note is left as it is (and a new annotation has none)."""
        new = [f"excluded.{c}" for c in _ANNOTATION_COLUMNS]
        new[7] = "CASE WHEN $12 THEN excluded.note ELSE a.note END"
        async with self._pool.acquire() as conn, conn.transaction():
            await _store_groups(conn, groups)
            label_counts = await _store_labels(conn, labels)
            rows = await conn.fetch(
                f"INSERT INTO annotation AS a (id, {', '.join(_ANNOTATION_COLUMNS)}) "
                "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], "
                "$6::int[], $7::text[], $8::jsonb[], $9::text[], $10::timestamptz[], "
                "$11::timestamptz[]) ON CONFLICT (id) DO UPDATE SET "
                + ", ".join(f"{c} = {v}" for c, v in zip(_ANNOTATION_COLUMNS, new, strict=True))
                + f", stored_at = now() WHERE ({', '.join(f'a.{c}' for c in _ANNOTATION_COLUMNS)}) "
                f"IS DISTINCT FROM ({', '.join(new)}) RETURNING (xmax = 0) AS inserted",
                [a.id for a in annotations], [a.label_id for a in annotations],
                [a.study_uid for a in annotations], [a.series_uid for a in annotations],
                [a.sop_uid for a in annotations], [a.frame for a in annotations],
                [a.reader for a in annotations],
                [None if a.geometry is None else orjson.dumps(a.geometry).decode()
                 for a in annotations],
                [a.note for a in annotations], [a.created_at for a in annotations],
                [a.updated_at for a in annotations], keep_notes,
            )
        return label_counts, _counts(rows, len(annotations))

    @translating
    async def held(self, annotations: Sequence[Annotation]) -> list[bool]:
        """For each annotation, whether the archive holds what it names: the study, the series
        in that study, the instance in that series."""
        studies = [a.study_uid for a in annotations]
        async with self._pool.acquire() as conn:
            # the studies' pks bound as a parameter: only their instance partitions are
            # planned (migrations/014)
            study_pks = await conn.fetchval(
                "SELECT coalesce(array_agg(pk), '{}') FROM study WHERE study_uid = ANY($1::text[])",
                studies,
            )
            rows = await conn.fetch(
                "SELECT EXISTS (SELECT 1 FROM study st "
                "  LEFT JOIN series se ON se.study_pk = st.pk AND se.series_uid = u.series "
                "  LEFT JOIN instance i ON i.study_pk = st.pk AND i.series_pk = se.pk "
                "    AND i.sop_uid = u.sop AND i.study_pk = ANY($4::bigint[]) "
                "  WHERE st.study_uid = u.study AND (u.series IS NULL OR se.pk IS NOT NULL) "
                "  AND (u.sop IS NULL OR i.pk IS NOT NULL)) "
                "FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY "
                "AS u(study, series, sop, n) ORDER BY u.n",
                studies, [a.series_uid for a in annotations], [a.sop_uid for a in annotations],
                study_pks,
            )
        return [r[0] for r in rows]

    @translating
    async def groups(self) -> list[LabelGroup]:
        rows = await self._pool.fetch("SELECT id, name FROM label_group ORDER BY id")
        return [LabelGroup(r["id"], r["name"]) for r in rows]

    @translating
    async def labels(self) -> list[Label]:
        rows = await self._pool.fetch(f"SELECT id, {', '.join(_LABEL_COLUMNS)} FROM label "
                                "ORDER BY group_id, id")
        return [_label(r) for r in rows]

    @translating
    async def stored_annotations(self, wanted: AnnotationFilter) -> list[Annotation]:
        """The stored annotations matching `wanted`, by study, series, instance, frame, reader."""
        where, params = _where(wanted)
        rows = await self._pool.fetch(
            f"SELECT a.id, a.{', a.'.join(_ANNOTATION_COLUMNS)} {_FROM} WHERE {where} "
            "ORDER BY a.study_uid, a.series_uid NULLS FIRST, a.sop_uid NULLS FIRST, "
            "a.frame NULLS FIRST, a.reader, a.id", *params,
        )
        return [Annotation(
            r["id"], r["label_id"], r["study_uid"], r["series_uid"], r["sop_uid"], r["frame"],
            r["reader"], None if r["geometry"] is None else orjson.loads(r["geometry"]), r["note"],
            r["created_at"], r["updated_at"],
        ) for r in rows]

    @translating
    async def global_choices(self, group: str | None = None,
                             study_uids: Sequence[str] | None = None) -> list[tuple[str, str, str]]:
        """(StudyInstanceUID, reader, label name) of every global annotation, of one label group
        (id or name) when given, of these studies when given."""
        rows = await self._pool.fetch(
            f"SELECT DISTINCT a.study_uid, a.reader, l.name {_FROM} WHERE l.type = 'global' "
            "AND ($1::text IS NULL OR g.id = $1 OR g.name = $1) "
            "AND ($2::text[] IS NULL OR a.study_uid = ANY($2::text[]))",
            group, None if study_uids is None else list(study_uids),
        )
        return [(r[0], r[1], r[2]) for r in rows]

    @translating
    async def group_exists(self, group: str) -> bool:
        return await self._pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM label_group WHERE id = $1 OR name = $1)", group)

    @translating
    async def label_exists(self, name: str) -> bool:
        return await self._pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM label WHERE name = $1)", name)

    @translating
    async def studies_labelled(self, name: str) -> list[str]:
        """The studies any reader gave a label of this name (on the examination or its images)."""
        rows = await self._pool.fetch(
            "SELECT DISTINCT a.study_uid FROM annotation a JOIN label l ON l.id = a.label_id "
            "WHERE l.name = $1 ORDER BY 1", name,
        )
        return [r[0] for r in rows]
