"""The label service, for the CLI and `/api/annotations` alike: load a shipped labelling
schema, import an MD.ai export (readers keyed, notes dropped unless kept explicitly, annotations
on UIDs the archive does not hold counted by position and not stored), and the reads: the
annotations, MD.ai's export shape, the readers' consensus, and the label filters of cohorts.

For DICOM output (SEG / SR): `annotations_and_labels(index, study_uids)` (what `labels
to-dicom` publishes), or `LabelService.annotations(study_uid=..., series_uid=..., reader=...)`
and `LabelService.labels()`.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from ricord_archive import audit_trail
from ricord_archive.deid import Keyring
from ricord_archive.errors import BadRequest, IndexUnavailable, StorageUnavailable
from ricord_archive.index.database import reporting_outages
from ricord_archive.index.facade import Index
from ricord_archive.index.labels import AnnotationFilter, Counts
from ricord_archive.labels import mdai
from ricord_archive.labels.consensus import consensus
from ricord_archive.labels.model import Annotation, Code, Label, LabelGroup
from ricord_archive.labels.schema import SchemaError, private_code, shipped_schema

log = logging.getLogger(__name__)
NOT_IN_ARCHIVE = "not-in-archive"
LABEL_FILTERS = ("label", "consensus")  # the cohort filters this service answers


@dataclass(frozen=True)
class ImportSummary:
    """What an import did, by counts and by position in the file: never a value."""

    labels: Counts
    annotations: Counts
    refusals: list[mdai.Refusal] = field(default_factory=list)
    studies: frozenset[str] = frozenset()  # the examinations whose annotations were stored

    @property
    def not_in_archive(self) -> int:
        return sum(1 for r in self.refusals if r.reason == NOT_IN_ARCHIVE)

    @property
    def refused(self) -> dict[str, int]:
        return dict(Counter(r.reason for r in self.refusals if r.reason != NOT_IN_ARCHIVE))

    def counts(self) -> dict[str, Any]:
        return {"labels": self.labels.as_dict(), "annotations": self.annotations.as_dict(),
                "notInArchive": self.not_in_archive, "refused": self.refused}

    def as_dict(self) -> dict[str, Any]:
        return {**self.counts(), "errors": [r.as_dict() for r in self.refusals]}

    def lines(self) -> list[str]:
        """The CLI's summary."""
        a, lb = self.annotations, self.labels
        refused = ", ".join(f"{n} {reason}" for reason, n in sorted(self.refused.items()))
        return [
            f"labels: imported {lb.imported}, updated {lb.updated}, unchanged {lb.unchanged}",
            f"annotations: imported {a.imported}, updated {a.updated}, unchanged "
            f"{a.unchanged}, refused {sum(self.refused.values())}"
            f"{f' ({refused})' if refused else ''}",
            f"{self.not_in_archive} annotations name images the archive does not hold (not "
            "stored)",
            *(f"{r.position}: {r.reason}" for r in self.refusals),
        ]


def _event(actor: audit_trail.Actor, protocol: str, action: audit_trail.EventId,
           detail: Mapping[str, Any], exc: BaseException | None = None) -> audit_trail.AuditEvent:
    return audit_trail.AuditEvent(
        action,
        audit_trail.Action.CREATE if action is audit_trail.EventId.IMPORT
        else audit_trail.Action.READ,
        audit_trail.Outcome.SUCCESS if exc is None else audit_trail.failure_outcome(exc),
        actor, protocol,
        resource="annotations",
        detail=dict(detail) if exc is None else {"reason": audit_trail.failure_reason(exc)},
    )


class LabelService:
    def __init__(self, index: Index, keys: Keyring,
                 trail: audit_trail.AuditTrail = audit_trail.NO_AUDIT) -> None:
        self.index = index
        self.keys = keys
        self.trail = trail

    async def init_schema(self, name: str) -> Counts:
        """Load a shipped schema (`ricord`); loading it again changes nothing."""
        try:
            schema = shipped_schema(name)
            counts = await self.index.labels.store_schema(schema.groups, schema.labels)
        except SchemaError as exc:
            raise BadRequest(str(exc)) from None
        except IndexUnavailable as exc:
            raise StorageUnavailable("the index is unavailable; try again later") from exc
        log.info("labelling schema %s: %d labels imported, %d updated, %d unchanged", name,
                 counts.imported, counts.updated, counts.unchanged)
        return counts

    async def import_export(self, actor: audit_trail.Actor, protocol: str, data: bytes,
                            keep_notes: bool = False) -> ImportSummary:
        """Import an MD.ai export (JSON bytes); recorded in the audit trail (counts only)."""
        try:
            summary = await self._import(data, keep_notes)
        except Exception as exc:
            self.trail.record(_event(actor, protocol, audit_trail.EventId.IMPORT, {}, exc))
            raise
        self.trail.record(_event(actor, protocol, audit_trail.EventId.IMPORT, {
            "labels": summary.labels.as_dict(), "annotations": summary.annotations.as_dict(),
            "notInArchive": summary.not_in_archive, "refusedByReason": summary.refused,
            "keepNotes": keep_notes,
        }))
        a = summary.annotations
        log.info("MD.ai export: annotations imported %d, updated %d, unchanged %d, not in the "
                 "archive %d, refused %d", a.imported, a.updated, a.unchanged,
                 summary.not_in_archive, sum(summary.refused.values()))
        return summary

    async def _import(self, data: bytes, keep_notes: bool) -> ImportSummary:
        try:
            document = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise BadRequest("the MD.ai export is not JSON") from None
        try:
            known = {label.id: label for label in await self.index.labels.labels()}
            parsed = mdai.parse_export(document, self.keys, known, _coder(known), keep_notes)
            located = parsed.annotations
            held = await self.index.labels.held([x.annotation for x in located])
            stored = [x.annotation for x, h in zip(located, held, strict=True) if h]
            label_counts, counts = await self.index.labels.store(
                parsed.groups, parsed.labels, stored, keep_notes)
        except mdai.ExportError as exc:
            raise BadRequest(str(exc)) from None
        except IndexUnavailable as exc:
            raise StorageUnavailable("the index is unavailable; import again later") from exc
        absent = [mdai.Refusal(x.position, NOT_IN_ARCHIVE)
                  for x, h in zip(located, held, strict=True) if not h]
        refusals = sorted([*parsed.refusals, *absent], key=_order)
        return ImportSummary(label_counts, counts, refusals,
                             frozenset(a.study_uid for a in stored))

    async def groups(self) -> list[LabelGroup]:
        async with reporting_outages():
            return await self.index.labels.groups()

    async def labels(self) -> list[Label]:
        """Every stored label, with its code."""
        async with reporting_outages():
            return await self.index.labels.labels()

    async def annotations(self, study_uid: str | None = None, series_uid: str | None = None,
                          reader: str | None = None, label: str | None = None,
                          group: str | None = None) -> list[Annotation]:
        """The stored annotations, filtered by study, series, reader code, label (id or
        name), label group (id or name)."""
        async with reporting_outages():
            return await self.index.labels.stored_annotations(AnnotationFilter(
                study_uid, series_uid, label, group, reader))

    async def export(self, actor: audit_trail.Actor, protocol: str,
                     wanted: AnnotationFilter) -> dict[str, Any]:
        """MD.ai's export shape: the whole schema and the annotations matching `wanted`."""
        async with reporting_outages():
            found = await self.index.labels.stored_annotations(wanted)
            document = mdai.to_export(await self.index.labels.groups(),
                                      await self.index.labels.labels(), found)
        self.trail.record(_event(actor, protocol, audit_trail.EventId.EXPORT,
                                 {"annotations": len(found)}))
        return document

    async def consensus(self, label_group: str | None = None) -> list[dict[str, Any]]:
        async with reporting_outages():
            if label_group is not None and not await self.index.labels.group_exists(label_group):
                raise BadRequest("label_group names no label group")
            return consensus(await self.index.labels.global_choices(label_group))


def _order(refusal: mdai.Refusal) -> tuple[int, ...]:
    """Refusals in file order: the label groups first, then the datasets' annotations."""
    numbers = (int(n) for n in re.findall(r"[0-9]+", refusal.position))
    return (refusal.position.startswith("datasets"), *numbers)


def _coder(known: Mapping[str, Label]) -> Callable[[str, str], Code]:
    """The code of a label a file gives none for: its stored one, else RICORD's label of the
    same name, else a private code."""
    ricord = shipped_schema("ricord")

    def code_for(label_id: str, name: str) -> Code:
        stored = known.get(label_id)
        if stored is not None:
            return stored.code
        return ricord.code_named(name) or private_code(label_id, name)

    return code_for


async def annotations_and_labels(
    index: Index, study_uids: Collection[str] | None = None,
) -> tuple[list[Annotation], dict[str, Label]]:
    """The stored annotations (of these examinations when given) and every label by id."""
    async with reporting_outages():
        if study_uids is None:
            found = await index.labels.stored_annotations(AnnotationFilter())
        else:
            found = [a for uid in sorted(study_uids)
                     for a in await index.labels.stored_annotations(
                         AnnotationFilter(study_uid=uid))]
        return found, {label.id: label for label in await index.labels.labels()}


async def split_label_filters(
    index: Index, filters: Mapping[str, str],
) -> tuple[set[str] | None, dict[str, str]]:
    """For cohorts: the studies the label filters (`label=<name>`: a reader gave it;
    `consensus=<name>`: in the readers' majority) leave (None when there are none), and the
    other filters."""
    rest = {k: v for k, v in filters.items() if k not in LABEL_FILTERS}
    studies: set[str] | None = None
    async with reporting_outages():
        for key in LABEL_FILTERS:
            name = filters.get(key)
            if name is None:
                continue
            if not await index.labels.label_exists(name):
                raise BadRequest(f"{key}: no label of that name")
            labelled = await index.labels.studies_labelled(name)
            if key == "consensus":
                items = consensus(await index.labels.global_choices(None, labelled))
                labelled = [i["StudyInstanceUID"] for i in items if name in i["majority"]]
            studies = set(labelled) if studies is None else studies & set(labelled)
    return studies, rest
