"""`ricord-archive import PATH... --site NAME`: DICOM files, folders (recursively), DICOMDIRs
(the files they reference) and zip files through the archive's own ingest pipeline (so
de-identified exactly as over DIMSE or STOW-RS), run in-process against the index.

Progress on stderr (counts and throughput), a summary at the end, and with `--report FILE` one
JSON line per file: path, size, mtime_ns, outcome (stored, duplicate, refused, unreadable,
failed), reason, and the de-identified SOP Instance UID. Re-running stores nothing new (ingest
recognises what is already stored: outcome `duplicate`); `--resume REPORT` skips, without
reading them, the files a previous report lists with the same path, size and modification time
and any outcome but `failed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sys
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import pydicom
from tqdm import tqdm

from ricord_archive.config import Config
from ricord_archive.errors import ArchiveError, RefusedObject, StorageUnavailable
from ricord_archive.services.ingest import IngestService
from ricord_archive.tools import ToolError
from ricord_archive.tools.services import archive_services, operator

log = logging.getLogger(__name__)
# A component of a DICOMDIR's Referenced File ID (PS3.10 allows A-Z, 0-9 and _; real media
# use more): never '.', '..', a separator or NUL, so records cannot point outside the folder.
_FILE_ID = re.compile(r"(?!\.\.?$)[A-Za-z0-9_.-]{1,255}")

OUTCOMES = ("stored", "duplicate", "refused", "unreadable", "failed")
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_DICOMDIR = "DICOMDIR"


@dataclass(frozen=True)
class Source:
    """One object to import: a file, or a member of a zip file (`label` is `zip!member`)."""

    label: str
    size: int
    mtime_ns: int
    path: Path
    member: str | None = None
    problem: str | None = None  # known unreadable before reading (e.g. a broken zip file)

    @property
    def key(self) -> tuple[str, int, int]:
        return self.label, self.size, self.mtime_ns


@dataclass(frozen=True)
class FileOutcome:
    """One line of the report."""

    path: str
    size: int
    mtime_ns: int
    outcome: str
    reason: str | None = None
    sop_instance_uid: str | None = None  # de-identified


@dataclass
class ImportSummary:
    outcomes: Counter[str] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)  # by reason
    skipped: int = 0
    bytes_read: int = 0

    def add(self, outcome: FileOutcome) -> None:
        self.outcomes[outcome.outcome] += 1
        if outcome.outcome == "refused":
            self.refusals[outcome.reason or "refused"] += 1

    def lines(self) -> list[str]:
        counts = self.outcomes
        return [
            f"stored: {counts['stored']}",
            f"already stored: {counts['duplicate']}",
            f"refused: {counts['refused']}",
            *(f"  {reason}: {n}" for reason, n in sorted(self.refusals.items())),
            f"unreadable: {counts['unreadable']}",
            f"failed (try again): {counts['failed']}",
            f"skipped (done in the --resume report): {self.skipped}",
        ]


def collect(paths: list[Path]) -> list[Source]:
    """Every object under `paths`, each file once: folders recursively (a DICOMDIR inside one
    is skipped, the walk finds its files), a DICOMDIR given itself is followed, zip files are
    opened (their DICOMDIR members skipped)."""
    seen: set[Path] = set()
    sources: list[Source] = []

    def add(path: Path, in_folder: bool) -> None:
        resolved = path.resolve()
        if resolved in seen:
            return
        seen.add(resolved)
        if path.name.upper() == _DICOMDIR:
            if not in_folder:
                for referenced in dicomdir_files(path):
                    add(referenced, False)
            return
        try:
            stat = path.stat()
            with path.open("rb") as handle:
                magic = handle.read(4)
        except OSError as exc:
            sources.append(Source(str(path), 0, 0, path, problem=exc.strerror or "unreadable"))
            return
        if magic in _ZIP_MAGIC:
            sources.extend(zip_members(path, stat.st_mtime_ns))
        else:
            sources.append(Source(str(path), stat.st_size, stat.st_mtime_ns, path))

    for path in paths:
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                add(child, True)
        elif path.is_file():
            add(path, False)
        else:
            raise ToolError(f"{path}: no such file or folder")
    return sources


def dicomdir_files(path: Path) -> list[Path]:
    """The files a DICOMDIR's directory records reference, relative to its folder."""
    try:
        dicomdir = pydicom.dcmread(path)
        records = dicomdir.DirectoryRecordSequence
    except Exception as exc:  # pydicom raises many kinds
        raise ToolError(f"{path}: not a readable DICOMDIR ({type(exc).__name__})") from exc
    files = []
    folder = path.parent.resolve()
    for record in records:
        file_id = record.get("ReferencedFileID")
        if file_id:
            parts = [str(p) for p in ([file_id] if isinstance(file_id, str) else file_id)]
            target = folder.joinpath(*parts).resolve()
            if not all(_FILE_ID.fullmatch(p) for p in parts) or not target.is_relative_to(folder):
                log.warning("%s: a directory record names a file outside its folder: skipped",
                            path)
                continue
            files.append(target)
    return files


def zip_members(path: Path, mtime_ns: int) -> list[Source]:
    """The files of a zip file (its folders and DICOMDIRs skipped)."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        return [Source(str(path), 0, mtime_ns, path, problem=f"broken zip file ({exc})")]
    return [
        Source(f"{path}!{m.filename}", m.file_size, mtime_ns, path, m.filename)
        for m in members
        if not m.is_dir() and m.filename.rsplit("/", 1)[-1].upper() != _DICOMDIR
    ]


def read_report(path: Path) -> dict[tuple[str, int, int], dict]:
    """A previous report's lines by (path, size, mtime_ns); lines that do not parse are
    ignored (a run interrupted mid-line)."""
    done: dict[tuple[str, int, int], dict] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ToolError(f"cannot read the report {path}: {exc.strerror}") from exc
    for line in lines:
        with contextlib.suppress(ValueError, TypeError, KeyError):
            record = json.loads(line)
            done[(str(record["path"]), int(record["size"]), int(record["mtime_ns"]))] = record
    return done


class _Reader:
    """Reads sources; each zip file is opened once (ZipFile reads are thread-safe)."""

    def __init__(self) -> None:
        self._zips: dict[Path, zipfile.ZipFile] = {}
        self._lock = threading.Lock()

    def read(self, source: Source) -> bytes:
        if source.member is None:
            return source.path.read_bytes()
        with self._lock:
            archive = self._zips.get(source.path)
            if archive is None:
                archive = self._zips[source.path] = zipfile.ZipFile(source.path)
        return archive.read(source.member)

    def close(self) -> None:
        for archive in self._zips.values():
            archive.close()


class FileImport:
    """Sources through ingest, `jobs` at a time, each outcome reported and counted."""

    def __init__(
        self, ingest: IngestService, site_name: str, max_bytes: int, report: TextIO | None,
    ) -> None:
        self.operator = operator()
        self.ingest = ingest
        self.site_name = site_name
        self.max_bytes = max_bytes
        self.report = report
        self.summary = ImportSummary()
        self._reader = _Reader()

    def record(self, outcome: FileOutcome) -> None:
        self.summary.add(outcome)
        if outcome.outcome in ("refused", "unreadable", "failed"):
            tqdm.write(f"{outcome.path}: {outcome.outcome}: {outcome.reason}", file=sys.stderr)
        self._write(asdict(outcome))

    def skip(self, previous: dict) -> None:
        self.summary.skipped += 1
        self._write(previous)

    def _write(self, record: dict) -> None:
        if self.report is not None:
            self.report.write(json.dumps(record) + "\n")
            self.report.flush()

    async def run(self, sources: list[Source], jobs: int, bar: tqdm) -> None:
        pending: Iterator[Source] = iter(sources)
        started = time.monotonic()

        async def worker() -> None:
            for source in pending:  # one shared iterator: each source goes to one worker
                self.record(await self.one(source))
                bar.update(1)
                rate = self.summary.bytes_read / max(time.monotonic() - started, 1e-6)
                counts = self.summary.outcomes
                bar.set_postfix_str(
                    f"stored {counts['stored']}, already {counts['duplicate']}, refused "
                    f"{counts['refused']}, unreadable {counts['unreadable']}, failed "
                    f"{counts['failed']}, {rate / 1e6:.1f} MB/s", refresh=False,
                )

        try:
            await asyncio.gather(*(worker() for _ in range(jobs)))
        finally:
            self._reader.close()

    async def one(self, source: Source) -> FileOutcome:
        """Read and store one source; every failure becomes an outcome with a reason."""
        def outcome(kind: str, reason: str | None = None, uid: str | None = None) -> FileOutcome:
            return FileOutcome(source.label, source.size, source.mtime_ns, kind, reason, uid)

        if source.problem is not None:
            return outcome("unreadable", source.problem)
        if source.size > self.max_bytes:
            return outcome("unreadable", f"larger than max_object_bytes ({self.max_bytes})")
        try:
            data = await asyncio.to_thread(self._reader.read, source)
        except (OSError, zipfile.BadZipFile, RuntimeError, ValueError) as exc:
            return outcome("unreadable", getattr(exc, "strerror", None) or type(exc).__name__)
        self.summary.bytes_read += len(data)
        try:
            result = await self.ingest.store(data, self.site_name, by=self.operator,
                                             protocol="import")
        except RefusedObject as exc:
            return outcome("refused", exc.reason, exc.sop_uid)
        except StorageUnavailable as exc:
            return outcome("failed", exc.message, exc.sop_uid)
        except ArchiveError as exc:  # not DICOM, too large, not processable
            return outcome("unreadable", exc.message, exc.sop_uid)
        except Exception as exc:
            return outcome("failed", type(exc).__name__)
        return outcome("duplicate" if result.duplicate else "stored", None, result.sop_uid)


async def import_files(
    config: Config, site_name: str, paths: list[Path], report_path: Path | None,
    resume_path: Path | None, jobs: int,
) -> ImportSummary:
    """Import `paths` for the site; progress and the summary on stderr."""
    config.site_named(site_name)  # an unknown site fails before anything starts
    previous = read_report(resume_path) if resume_path is not None else {}
    sources = collect(paths)
    report = report_path.open("w", encoding="utf-8") if report_path is not None else None
    try:
        async with archive_services(config) as services:
            run = FileImport(
                services.ingest, site_name, config.limits.max_object_bytes, report,
            )
            todo = []
            for source in sources:
                done = previous.get(source.key)
                if done is not None and done.get("outcome") != "failed":
                    run.skip(done)
                else:
                    todo.append(source)
            with tqdm(total=len(todo), desc="importing", unit="file", file=sys.stderr,
                      disable=None) as bar:  # None: shown on a terminal only
                await run.run(todo, jobs, bar)
    finally:
        if report is not None:
            report.close()
    for line in run.summary.lines():
        print(line, file=sys.stderr)
    return run.summary
