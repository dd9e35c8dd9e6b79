"""`ricord-archive labels init-schema NAME`, `labels import FILE.json [--dicom]` and `labels
to-dicom`: a shipped labelling schema, and an MD.ai export, into the archive through the same
service as `POST /api/annotations` (the file is read, never copied or kept); the annotations
published as DICOM SEG and SR (`tools.label_dicom`)."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import sys
from pathlib import Path
from typing import TextIO

from ricord_archive.config import Config
from ricord_archive.errors import ArchiveError
from ricord_archive.index.labels import Counts
from ricord_archive.services.labels import ImportSummary, LabelService, annotations_and_labels
from ricord_archive.tools import ToolError
from ricord_archive.tools.label_dicom import labels_to_dicom
from ricord_archive.tools.services import archive_services, operator

log = logging.getLogger(__name__)


async def init_schema(config: Config, name: str, out: TextIO) -> Counts:
    async with archive_services(config) as services:
        try:
            counts = await LabelService(services.index, services.keys).init_schema(name)
        except ArchiveError as exc:
            raise ToolError(exc.message) from None
    print(f"schema {name}: labels imported {counts.imported}, updated {counts.updated}, "
          f"unchanged {counts.unchanged}", file=out)
    return counts


async def import_labels(config: Config, path: Path, keep_notes: bool,
                        out: TextIO) -> ImportSummary:
    """Import the MD.ai export at `path` and print the summary."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ToolError(f"cannot read {path}: {exc.strerror}") from exc
    async with archive_services(config) as services:
        service = LabelService(services.index, services.keys, services.audit)
        try:
            summary = await service.import_export(operator(), "CLI", data, keep_notes)
        except ArchiveError as exc:
            raise ToolError(exc.message) from None
    print("\n".join(summary.lines()), file=out)
    return summary


def run(config: Config, args: argparse.Namespace) -> int:
    try:
        if args.labels_command == "init-schema":
            asyncio.run(init_schema(config, args.name, sys.stdout))
            return 0
        if args.labels_command == "to-dicom":
            load = functools.partial(annotations_and_labels, study_uids=args.study or None)
            asyncio.run(labels_to_dicom(config, load, sys.stdout))
            return 0
        summary = asyncio.run(import_labels(config, args.file, args.keep_notes, sys.stdout))
        if args.dicom and summary.studies:
            load = functools.partial(annotations_and_labels, study_uids=summary.studies)
            asyncio.run(labels_to_dicom(config, load, sys.stdout))
    except ToolError as exc:
        log.error("%s", exc)
        return 2
    return 1 if summary.refusals else 0
