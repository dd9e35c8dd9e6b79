"""The cohort service: freeze the series a query matches (the one query engine, with clinical
columns), and hand a cohort out as a manifest, metadata.csv, a file list, or one ZIP."""

from __future__ import annotations

import asyncio
import builtins
import datetime as dt
import hashlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ricord_archive.blobstore import Blob, BlobStore
from ricord_archive.clinical import export as clinical_export
from ricord_archive.dicom.zip_layout import Entry, ZipLayout
from ricord_archive.errors import BadRequest, Gone, NotFound
from ricord_archive.index.cohorts import Cohort, CohortFile, NewCohort
from ricord_archive.index.database import reporting_outages
from ricord_archive.index.facade import Index
from ricord_archive.instances import StoredInstance
from ricord_archive.search.model import Level, Query, Term, UidList
from ricord_archive.search.qido import parse_qido
from ricord_archive.services import cohort_export
from ricord_archive.services.clinical import split_filters
from ricord_archive.services.cohort_export import CohortSpec, SeriesRow
from ricord_archive.services.labels import split_label_filters

_CHUNK = 1024 * 1024
_CRC_THREADS = 4
__all__ = ["Cohort", "CohortArchive", "CohortService"]


@dataclass(frozen=True)
class CohortArchive:
    """A cohort as one ZIP: its layout and, per entry, the blob or the bytes it holds."""

    layout: ZipLayout
    sources: list[Blob | bytes]
    etag: str


def crc32_of(blob: Blob, size: int) -> int:
    """The CRC-32 of a stored object, read in chunks (blocking)."""
    crc, read = 0, 0
    with blob.open() as stream:
        while chunk := stream.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            read += len(chunk)
    if read != size:
        raise OSError("a stored object is shorter or longer than the index says")
    return crc


class CohortService:
    def __init__(self, index: Index, blobs: BlobStore) -> None:
        self.index = index
        self.blobs = blobs

    async def _query(self, filters: dict[str, str], site_id: int | None) -> Query:
        """The series-level query of a cohort's filters: QIDO-RS keys through the query
        engine, clinical columns as the studies whose clinical rows match them, label filters
        (`label=`, `consensus=`) as the studies whose annotations match them."""
        labelled, filters = await split_label_filters(self.index, filters)
        clinical, dicom = await split_filters(self.index, site_id, filters)
        query = parse_qido(Level.SERIES, dicom.items(), max_limit=1)
        if query.ignored:  # a cohort never silently ignores a filter
            raise BadRequest("; ".join(query.ignored))
        terms = list(query.terms)
        studies = labelled
        if clinical is not None:
            async with reporting_outages():
                uids = await self.index.clinical.matching_study_uids(clinical)
            studies = uids if studies is None else studies & uids
        if studies is not None:
            terms.append(Term("StudyInstanceUID", UidList(tuple(sorted(studies)))))
        return replace(query, terms=tuple(terms), site_id=site_id)

    async def _clinical_csv(self, study_uids: Sequence[str]) -> bytes:
        """clinical.csv: the clinical row of each study that has one, as GET /api/clinical
        exports it."""
        async with reporting_outages():
            rows = await self.index.clinical.clinical_rows(
                clinical_export.ClinicalFilter(), study_uids)
        extra = {k for row in rows for k in row} - set(clinical_export.OUTPUT_COLUMNS)
        return clinical_export.to_csv(
            clinical_export.column_names(extra, False),
            [clinical_export.renamed(r, False) for r in rows],
        ).encode("utf-8")

    async def create(self, spec: CohortSpec, site_id: int | None,
                     created_by: str | None) -> Cohort:
        """Freeze the series matching the filters now (only `site_id`'s when given)."""
        query = await self._query(spec.filters, site_id)
        async with reporting_outages():
            files = await self.index.cohorts.matching_files(query)
        if not files:  # nothing to freeze; and a filter value that matches nothing (an
            # original identifier typed by mistake) is never stored
            raise BadRequest("no series match the filters: a cohort is never created empty")
        crcs = await self._crcs(files)
        firsts: dict[int, CohortFile] = {}
        for f in files:
            firsts.setdefault(f.series_pk, f)
        async with reporting_outages():
            records = await self.index.cohorts.series_records(list(firsts.values()))
        clinical = await self._clinical_csv(list(dict.fromkeys(f.study_uid for f in files)))
        images: dict[int, list[CohortFile]] = {}
        for f in files:
            images.setdefault(f.series_pk, []).append(f)
        metadata = cohort_export.metadata_csv(spec.name, (
            SeriesRow(r.study_json, r.series_json, r.instance_json, r.sop_class_uid,
                      firsts[r.series_pk].pseudonym, len(images[r.series_pk]),
                      sum(f.size_bytes for f in images[r.series_pk]))
            for r in records
        ))
        new = NewCohort(spec.name, spec.description, spec.license, spec.citation, spec.filters,
                        site_id, created_by)
        async with reporting_outages():
            cohort_id = await self.index.cohorts.insert_cohort(new, files, crcs, metadata, clinical)
        return await self.get(cohort_id, None)

    async def _crcs(self, files: Sequence[CohortFile]) -> list[int]:
        """Each object's CRC-32: known from an earlier cohort, else read from the store
        (a few threads at a time)."""
        crcs = [f.crc32 for f in files]
        todo = iter([n for n, crc in enumerate(crcs) if crc is None])

        async def worker() -> None:
            for n in todo:
                f = files[n]
                crcs[n] = await asyncio.to_thread(
                    crc32_of, Blob(self.blobs, f.blob_key, f.size_bytes), f.size_bytes)

        await asyncio.gather(*(worker() for _ in range(_CRC_THREADS)))
        return [crc for crc in crcs if crc is not None]

    async def list(self, site_id: int | None) -> list[Cohort]:
        async with reporting_outages():
            return await self.index.cohorts.list_cohorts(site_id)

    async def get(self, cohort_id: int, site_id: int | None) -> Cohort:
        async with reporting_outages():
            found = await self.index.cohorts.get_cohort(cohort_id, site_id)
        if found is None:
            raise NotFound("no such cohort")
        return found

    async def delete(self, cohort_id: int) -> None:
        async with reporting_outages():
            if not await self.index.cohorts.delete_cohort(cohort_id):
                raise NotFound("no such cohort")

    async def manifest(self, cohort: Cohort, download_url: str) -> bytes:
        async with reporting_outages():
            uids = await self.index.cohorts.cohort_series_uids(cohort.id)
        return cohort_export.manifest(download_url, cohort.name, uids)

    async def metadata_csv(self, cohort: Cohort) -> bytes:
        async with reporting_outages():
            return (await self.index.cohorts.cohort_texts(cohort.id))[0]

    async def _contents(self, cohort: Cohort
                        ) -> tuple[builtins.list[CohortFile], builtins.list[str],
                                   dict[str, bytes]]:
        """The cohort's objects, their names in the ZIP, and its text files by name; Gone when
        an object was replaced since the cohort was frozen (its bytes are no longer kept)."""
        async with reporting_outages():
            if await self.index.cohorts.replaced_files(cohort.id):
                raise Gone("objects of this cohort were replaced since it was frozen: create "
                           "the cohort again")
            files = await self.index.cohorts.cohort_files(cohort.id)
            metadata, clinical = await self.index.cohorts.cohort_texts(cohort.id)
        names = cohort_export.entry_names([
            cohort_export.series_folder(f.pseudonym, f.study_uid, f.series_uid) for f in files
        ])
        texts = {"metadata.csv": metadata, "clinical.csv": clinical,
                 "LICENSE.txt": cohort.license.encode(), "CITATION.txt": cohort.citation.encode()}
        return files, names, texts

    async def archive(self, cohort: Cohort) -> CohortArchive:
        """The cohort's ZIP: every object, then metadata.csv, clinical.csv, LICENSE.txt and
        CITATION.txt; every CRC known up front, so any byte range can be served."""
        return self._archive(cohort, *await self._contents(cohort))

    def _archive(self, cohort: Cohort, files: builtins.list[CohortFile], names: builtins.list[str],
                 texts: dict[str, bytes]) -> CohortArchive:
        entries = [Entry(name, f.size_bytes, f.crc32) for name, f in zip(names, files, strict=True)]
        entries += [Entry(name, len(data), zlib.crc32(data)) for name, data in texts.items()]
        layout = ZipLayout(entries, cohort.created_at)
        sources: list[Blob | bytes] = [Blob(self.blobs, f.blob_key, f.size_bytes) for f in files]
        sources += texts.values()
        tag = hashlib.sha256(f"{cohort.id}:{cohort.created_at.isoformat()}:{layout.size}".encode())
        return CohortArchive(layout, sources, f'"{tag.hexdigest()[:32]}"')

    async def instances_archive(self, found: Sequence[tuple[StoredInstance, Blob]]
                                ) -> tuple[ZipLayout, builtins.list[Blob | bytes]]:
        """Instances retrieved by WADO-RS as a ZIP of the cohorts' layout (the objects only);
        CRCs are computed as they are sent (data descriptors)."""
        async with reporting_outages():
            subject = await self.index.cohorts.subjects(list({i.study_uid for i, _ in found}))
        names = cohort_export.entry_names([
            cohort_export.series_folder(subject[i.study_uid], i.study_uid, i.series_uid)
            for i, _ in found
        ])
        entries = [Entry(name, i.size_bytes) for name, (i, _) in zip(names, found, strict=True)]
        return ZipLayout(entries, dt.datetime.now(dt.UTC)), [blob for _, blob in found]

    async def file_list(self, cohort: Cohort
                        ) -> tuple[CohortArchive, builtins.list[dict[str, object]]]:
        """The cohort's ZIP, and each file of it with its size and SHA-256 (for a downloader's
        check)."""
        files, names, texts = await self._contents(cohort)
        listed: list[dict[str, object]] = [
            {"path": name, "size": f.size_bytes, "sha256": f.sha256.hex()}
            for name, f in zip(names, files, strict=True)
        ]
        listed += [{"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                   for name, data in texts.items()]
        return self._archive(cohort, files, names, texts), listed
