"""`ricord-archive clinical import`: a site's clinical sheet (CSV or .xlsx) into the archive,
through the same service as `POST /api/clinical`. The file is read, never copied or kept."""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

from ricord_archive.clinical import sheet
from ricord_archive.config import Config
from ricord_archive.errors import ArchiveError
from ricord_archive.services.clinical import ClinicalService, ImportSummary
from ricord_archive.tools import ToolError
from ricord_archive.tools.services import archive_services, operator

_MEDIA_TYPES = {".csv": sheet.CSV, ".xlsx": sheet.XLSX}


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ToolError(f"cannot read {path}: {exc.strerror}") from exc


async def import_clinical(
    config: Config, site_name: str, path: Path, sheet_name: str | None,
    columns: Path | None, out: TextIO,
) -> ImportSummary:
    """Import the sheet at `path` for a site and print the summary."""
    config.site_named(site_name)  # an unknown site fails before any database is started
    media_type = _MEDIA_TYPES.get(path.suffix.lower())
    if media_type is None:
        raise ToolError("a clinical sheet is a .csv or an .xlsx file")
    data = _read(path)
    try:
        map_text = _read(columns).decode("utf-8") if columns is not None else None
    except UnicodeDecodeError:
        raise ToolError("the column map is not UTF-8 text") from None
    async with archive_services(config) as services:
        clinical = ClinicalService(services.index, services.keys, services.ingest,
                                   services.audit)
        try:
            summary = await clinical.import_sheet(
                operator(), "CLI", site_name, data, media_type, sheet_name, map_text
            )
        except ArchiveError as exc:
            raise ToolError(exc.message) from None
    print("\n".join(summary.lines()), file=out)
    return summary
