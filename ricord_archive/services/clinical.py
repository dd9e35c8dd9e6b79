"""The clinical data service, for the CLI and `/api/clinical` alike: one import pipeline (read
the sheet, check it, allocate its patients as ingest would, key it like the images, store it in
one transaction) and the export. The sheet itself is never kept; every event goes into the
audit trail with counts only.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ricord_archive import audit_trail
from ricord_archive.clinical import columns as col
from ricord_archive.clinical import export, sheet
from ricord_archive.deid import Keyring
from ricord_archive.errors import BadRequest, IndexUnavailable, StorageUnavailable
from ricord_archive.index.clinical import ColumnConflict
from ricord_archive.index.facade import Index
from ricord_archive.index.store import Site
from ricord_archive.services.ingest import IngestService

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImportSummary:
    """What an import did, by counts and by row and column: never a value."""

    imported: int
    updated: int
    unchanged: int
    not_in_archive: int  # examinations whose study has not arrived (linked when it does)
    refusals: list[sheet.Refusal] = field(default_factory=list)

    @property
    def refused(self) -> dict[str, int]:
        return dict(Counter(r.reason for r in self.refusals))

    def counts(self) -> dict[str, Any]:
        return {"imported": self.imported, "updated": self.updated,
                "unchanged": self.unchanged, "refused": self.refused,
                "notInArchive": self.not_in_archive}

    def as_dict(self) -> dict[str, Any]:
        return {**self.counts(), "errors": [r.as_dict() for r in self.refusals]}

    def lines(self) -> list[str]:
        """The CLI's summary."""
        refused = ", ".join(f"{n} {reason}" for reason, n in sorted(self.refused.items()))
        return [
            f"imported {self.imported}, updated {self.updated}, unchanged {self.unchanged}, "
            f"refused {len(self.refusals)}{f' ({refused})' if refused else ''}",
            f"{self.not_in_archive} examinations not yet in the archive (linked when their "
            "images arrive)",
            *(f"row {r.line}{f', column {r.column}' if r.column else ''}: {r.reason}: "
              f"{r.message}" for r in self.refusals),
        ]


@dataclass(frozen=True)
class Export:
    header: list[str]
    rows: list[dict[str, Any]]


class ClinicalService:
    def __init__(self, index: Index, keys: Keyring, ingest: IngestService,
                 trail: audit_trail.AuditTrail = audit_trail.NO_AUDIT) -> None:
        self.index = index
        self.keys = keys
        self.ingest = ingest  # allocates patients as for the images
        self.trail = trail

    def site(self, name: str) -> Site:
        site = self.ingest.sites.get(name)
        if site is None:
            raise BadRequest("no configured site of that name")
        return site

    async def declare(self, site_name: str, map_text: str) -> list[str]:
        """Record a column map's declarations for a site; the declared names."""
        try:
            columns = col.parse_column_map(map_text)
            await self.index.clinical.declare_columns(self.site(site_name).id, columns.values())
        except (col.ColumnMapError, ColumnConflict) as exc:
            raise BadRequest(str(exc)) from None
        except IndexUnavailable as exc:
            raise StorageUnavailable("the index is unavailable; try again later") from exc
        log.info("site %s declared %d clinical columns", site_name, len(columns))
        return sorted(columns)

    async def import_sheet(
        self, actor: audit_trail.Actor, protocol: str, site_name: str, data: bytes,
        media_type: str, sheet_name: str | None = None, map_text: str | None = None,
    ) -> ImportSummary:
        """Import a sheet for a site; recorded in the audit trail (counts only)."""
        try:
            summary = await self._import(site_name, data, media_type, sheet_name, map_text)
        except Exception as exc:
            self.trail.record(audit_trail.clinical_imported(actor, protocol, site_name, {}, exc))
            raise
        self.trail.record(audit_trail.clinical_imported(actor, protocol, site_name, {
            **summary.counts(), "refused": len(summary.refusals),
            "refusedByReason": summary.refused,
        }))
        log.info("clinical sheet for site %s: imported %d, updated %d, unchanged %d, "
                 "refused %d", site_name, summary.imported, summary.updated, summary.unchanged,
                 len(summary.refusals))
        return summary

    async def _import(
        self, site_name: str, data: bytes, media_type: str, sheet_name: str | None,
        map_text: str | None,
    ) -> ImportSummary:
        site = self.site(site_name)
        try:
            mapped = col.parse_column_map(map_text) if map_text is not None else {}
            table = sheet.read_table(data, media_type, sheet_name)
            known = {c.name: c for c in await self.index.clinical.declared_columns(site.id)}
            parsed = sheet.parse_sheet(table, {**known, **mapped})
            rows = []
            for row in parsed.rows:
                patient = await self.ingest.patients.resolve(  # exactly as for an image
                    site, self.ingest.config.sites[site.name], row.patient_id,
                    row.issuer or "",
                )
                rows.append((patient.pk, sheet.keyed(row, self.keys, site.siteid,
                                                     patient.date_offset_days)))
            stored = await self.index.clinical.store_rows(site.id, rows, parsed.present,
                                                          list(mapped.values()))
            absent = await self.index.clinical.studies_absent(
                site.id, [r for _, r in rows if r.line not in stored.named_twice])
        except (sheet.SheetError, col.ColumnMapError, ColumnConflict) as exc:
            raise BadRequest(str(exc)) from None
        except IndexUnavailable as exc:
            raise StorageUnavailable("the index is unavailable; import again later") from exc
        twice = [sheet.Refusal(line, col.ACCESSION, sheet.DUPLICATE_EXAMINATION,
                               "the examination is named by another row too")
                 for line in stored.named_twice]
        return ImportSummary(stored.imported, stored.updated, stored.unchanged, absent,
                             sorted([*parsed.refusals, *twice], key=lambda r: r.line))

    async def export(
        self, actor: audit_trail.Actor, protocol: str, site_name: str | None,
        params: Iterable[tuple[str, str]], ricord: bool = False,
    ) -> Export:
        """The rows matching a request's filters, limited to a site when named."""
        params = list(params)
        site_id = self.site(site_name).id if site_name is not None else None
        try:
            declared = export.merge_declared(await self.index.clinical.declared_columns(site_id))
            wanted = export.parse_filters(params, site_id, declared)
            rows = await self.index.clinical.clinical_rows(wanted)
        except export.FilterError as exc:
            raise BadRequest(str(exc)) from None
        except IndexUnavailable as exc:
            raise StorageUnavailable("the index is unavailable; try again later") from exc
        extra = {k for row in rows for k in row} - set(export.OUTPUT_COLUMNS)
        self.trail.record(audit_trail.clinical_exported(
            actor, protocol, site_name, sorted({k for k, _ in params} - export.CONTROL),
            len(rows),
        ))
        return Export(export.column_names(extra, ricord),
                      [export.renamed(r, ricord) for r in rows])


async def split_filters(
    index: Index, site_id: int | None, filters: Mapping[str, str],
) -> tuple[export.ClinicalFilter | None, dict[str, str]]:
    """For cohorts: the clinical part of mixed filters (None when they name no clinical
    column) and the rest (the QIDO-RS keys), at a site (its index id; None: every site). Then
    `index.clinical.matching_study_uids(clinical)` gives the matching studies."""
    try:
        declared = export.merge_declared(await index.clinical.declared_columns(site_id))
        keys = export.clinical_keys(declared)
        clinical = [(k, v) for k, v in filters.items() if k in keys]
        wanted = export.parse_filters(clinical, site_id, declared) if clinical else None
    except export.FilterError as exc:
        raise BadRequest(str(exc)) from None
    except IndexUnavailable as exc:
        raise StorageUnavailable("the index is unavailable; try again later") from exc
    return wanted, {k: v for k, v in filters.items() if k not in keys}
