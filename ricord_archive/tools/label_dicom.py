"""`ricord-archive labels to-dicom` (and `labels import --dicom`): the labels the archive holds,
published as each reader's SEG and SR objects, through the same service a server would use."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TextIO

from ricord_archive.config import Config
from ricord_archive.errors import ArchiveError
from ricord_archive.index.facade import Index
from ricord_archive.labels.model import Annotation, Label
from ricord_archive.services.label_dicom import LabelDicomService, PublishReport
from ricord_archive.tools import ToolError
from ricord_archive.tools.services import archive_services, operator

# Reads the annotations to publish and the labels by id, from the archive's index.
Loader = Callable[[Index], Awaitable[tuple[Sequence[Annotation], Mapping[str, Label]]]]


async def labels_to_dicom(config: Config, load: Loader, out: TextIO | None = None
                          ) -> PublishReport:
    """Publish what `load` reads as DICOM SEG and SR into the archive; print the summary."""
    async with archive_services(config) as services:
        annotations, labels = await load(services.index)
        service = LabelDicomService(services.ingest, services.retrieve, services.keys)
        try:
            report = await service.publish(annotations, labels, operator())
        except ArchiveError as exc:
            raise ToolError(exc.message) from None
    if out is not None:
        print("\n".join(report.lines()), file=out)
    return report
