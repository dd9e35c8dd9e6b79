"""Blobs on the local filesystem: new ones appended to segment files (`segments`,
`segment_writer`), older ones files of their own. Its maintenance (temporary files a crash
left behind, segments with no live blob) is file-only and lives here."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ricord_archive.blobstore import segments
from ricord_archive.blobstore.keys import (
    RECORD,
    RECORDS,
    check_key,
    check_record,
    is_file_key,
    new_key,
)
from ricord_archive.blobstore.segment_writer import SegmentWriter
from ricord_archive.blobstore.segments import Location, fsync_dir, write_file


class FileBlobStore:
    """Blobs on the local filesystem: new ones appended to segment files (`segments`); keys of
    files of their own (`xx/xx/<hex>.dcm`, every blob before segments) read, listed and
    deleted as before. Without `segment_bytes` every blob is a file of its own, written to a
    temporary file, fsynced, renamed into place, and the folder fsynced."""

    def __init__(self, root: Path, segment_bytes: int | None = None) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.segments = segments.SegmentFiles(root / "segments")
        self.records = FileRecordStore(root / RECORDS, self.tmp)
        self._writer = (SegmentWriter(self.segments, self.tmp, segment_bytes)
                        if segment_bytes else None)

    def new_key(self) -> str:
        """A segment slot's key; a file's of its own without segments, or while no segment
        is ready (never blocks on reserving space, never fails: a write reports what went wrong)."""
        return (self._writer.new_key() if self._writer is not None else None) or new_key()

    def settle(self) -> None:
        """Wait until the segment in use is reserved ahead and the next one is ready
        (benchmarks: no reserving while they measure)."""
        if self._writer is not None:
            self._writer.settle()

    def close(self) -> None:
        """Stop appending (tests and benchmarks; a server simply exits)."""
        if self._writer is not None:
            self._writer.close()

    def path(self, key: str) -> Path:
        """The file of a blob of its own, or the segment holding the blob."""
        found = segments.parse_key(check_key(key))
        return self.segments.path(found[0]) if found else self.root / key

    def local_file(self, key: str) -> Location:
        """The file holding the blob and the offset of its first byte (for sendfile)."""
        if segments.parse_key(check_key(key)):
            return self.segments.location(key)
        return Location(self.root / key, 0)

    def write(self, key: str, data: bytes) -> None:
        if segments.parse_key(check_key(key)):
            if self._writer is None:
                raise ValueError("not a key this blob store handed out for writing")
            self._writer.write(key, data)
        else:
            write_file(self.root / key, self.tmp, data)

    def quick(self, key: str, size: int) -> bool:
        return self._writer is not None and self._writer.quick(check_key(key), size)

    def open(self, key: str, size: int | None = None) -> BinaryIO:
        if segments.parse_key(check_key(key)):
            return self.segments.open(key)
        return (self.root / key).open("rb")

    def delete(self, key: str) -> None:
        if segments.parse_key(check_key(key)):
            self.segments.delete(key)
        else:
            (self.root / key).unlink(missing_ok=True)

    def walk(self) -> Iterator[tuple[str, int, float]]:
        for path in self.root.glob("??/??/*.dcm"):
            key = path.relative_to(self.root).as_posix()
            if is_file_key(key):
                stat = path.stat()
                yield key, stat.st_size, stat.st_mtime
        yield from self.segments.walk()

    def probe(self) -> None:
        """A partial write's name: a crash between writing and removing leaves a file the
        orphan collector removes."""
        probe = self.tmp / f"probe-{uuid.uuid4().hex}.part"
        probe.write_bytes(b"ready?")
        probe.unlink()

    def temporary_files(self) -> Iterator[tuple[str, float]]:
        """Names and modification times of files that hold no blob: partial writes a crash
        left behind, segments whose blobs were all deleted."""
        for path in self.tmp.glob("*.part"):
            yield path.name, path.stat().st_mtime
        yield from self.segments.unused()

    def remove_temporary(self, name: str) -> None:
        if name.startswith("segments/"):
            self.segments.remove(name)
        elif re.fullmatch(r"[^/\\]+\.part", name):  # a name from temporary_files, no path
            (self.tmp / name).unlink(missing_ok=True)


class FileRecordStore:
    """Allocation records as small JSON files under `<blobs>/records`, each replaced whole:
    written to a temporary file, fsynced, renamed into place, the folder fsynced."""

    def __init__(self, root: Path, tmp: Path) -> None:
        self.root, self.tmp = root, tmp

    def write(self, name: str, data: bytes) -> None:
        final = self.root / check_record(name)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        with tmp.open("wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)

    def read(self, folder: str) -> Iterator[tuple[str, bytes]]:
        for path in sorted((self.root / folder).glob("*.json")):
            name = f"{folder}/{path.name}"
            if RECORD.fullmatch(name):
                yield name, path.read_bytes()
