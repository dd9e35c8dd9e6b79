"""Publishing labels as DICOM, for `labels to-dicom` and `labels import --dicom` alike: each
reader's SEG of a series and SR of an examination (`labels.dicom`), built from the archive's
own de-identified instances and stored through ingest's trusted entry for the archive's own
objects (`IngestService.store_own`), where QIDO-RS finds them and WADO-RS returns them.
Publishing again after a corrected import overwrites each object under its keyed SOP Instance
UID; an unchanged object is left as it is.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from ricord_archive.audit_trail import Actor
from ricord_archive.blobstore import Blob
from ricord_archive.deid import Keyring
from ricord_archive.errors import NotFound
from ricord_archive.labels import dicom
from ricord_archive.labels.model import Annotation, Label
from ricord_archive.services.ingest import IngestService
from ricord_archive.services.retrieve import RetrieveService

log = logging.getLogger(__name__)
PROTOCOL = "labels-to-dicom"  # how the audit trail names the objects published here


@dataclass(frozen=True)
class Published:
    """One stored SEG or SR, by the archive's UIDs; `outcome` is 'inserted', 'replaced' or
    'unchanged'."""

    kind: str
    reader: str
    study_uid: str
    series_uid: str
    sop_uid: str
    outcome: str

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "reader": self.reader, "StudyInstanceUID": self.study_uid,
                "SeriesInstanceUID": self.series_uid, "SOPInstanceUID": self.sop_uid,
                "outcome": self.outcome}


@dataclass(frozen=True)
class PublishReport:
    published: list[Published] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> annotations left out

    def counts(self) -> Counter[str]:
        return Counter(f"{p.kind} {p.outcome}" for p in self.published)

    def as_dict(self) -> dict[str, Any]:
        return {"published": [p.as_dict() for p in self.published],
                "counts": dict(self.counts()), "skipped": dict(self.skipped)}

    def lines(self) -> list[str]:
        """The CLI's summary."""
        counts = self.counts()
        return [
            *(f"{kind}: {counts[f'{kind} inserted']} new, {counts[f'{kind} replaced']} "
              f"replaced, {counts[f'{kind} unchanged']} unchanged" for kind in dicom.Kind),
            *(f"{n} annotations left out: {reason}" for reason, n in
              sorted(self.skipped.items())),
        ]


class LabelDicomService:
    def __init__(self, ingest: IngestService, retrieve: RetrieveService, keys: Keyring) -> None:
        self.ingest = ingest
        self.retrieve = retrieve
        self.keys = keys

    async def publish(self, annotations: Sequence[Annotation], labels: Mapping[str, Label],
                      by: Actor) -> PublishReport:
        """Build and store the SEG and SR objects of `annotations` (`labels` by id), each
        stored object audited as published by `by`."""
        plan = dicom.plan(annotations, labels)
        report = PublishReport(skipped=Counter(plan.skipped))
        for target in plan.targets:
            try:
                sources = await self._sources(target.scope)
                built = await asyncio.to_thread(dicom.build, target, labels, sources, self.keys)
            except NotFound:
                report.skipped[f"{target.kind}: source not in the archive"] += len(
                    target.annotations)
                continue
            except dicom.LabelObjectError as exc:
                report.skipped[f"{target.kind}: {exc}"] += len(target.annotations)
                continue
            report.skipped.update(built.skipped)
            outcome = await self.ingest.store_own(built.dataset, by=by, protocol=PROTOCOL)
            ds = built.dataset
            report.published.append(Published(
                target.kind, target.reader, str(ds.StudyInstanceUID),
                str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                "unchanged" if outcome == "duplicate" else outcome,
            ))
        log.info("labels published as DICOM: %s", dict(report.counts()))
        return report

    async def _sources(self, scope: tuple[str, ...]) -> list[Dataset]:
        """The stored instances of a study or series, read up to their pixel data."""
        found = await self.retrieve.instances(*scope)
        return await asyncio.to_thread(lambda: [_header(blob) for _, blob in found])


def _header(blob: Blob) -> Dataset:
    with blob.open() as stream:
        return pydicom.dcmread(stream, stop_before_pixels=True)
