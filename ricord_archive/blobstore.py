"""The blob store on a local filesystem: four verbs, server-generated keys, never overwritten.

A write goes to a temporary file, is fsynced, renamed into place, and the directory fsynced,
so a key that reaches the index always names complete bytes.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

_KEY = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{32}\.dcm$")


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def new_key() -> str:
        name = uuid.uuid4().hex
        return f"{name[:2]}/{name[2:4]}/{name}.dcm"

    def path(self, key: str) -> Path:
        """The file of a key; keys are only ever ones this store generated."""
        if not _KEY.match(key):
            raise ValueError("not a blob key of this store")
        return self.root / key

    def write(self, key: str, data: bytes) -> None:
        """Write `data` durably under `key`, a new key from `new_key`."""
        final = self.path(key)
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, final)
        _fsync_dir(final.parent)

    def get(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def walk(self) -> Iterator[tuple[str, int, float]]:
        """(key, size, modification time) of every blob on disk."""
        for path in self.root.glob("??/??/*.dcm"):
            key = path.relative_to(self.root).as_posix()
            if _KEY.match(key):
                stat = path.stat()
                yield key, stat.st_size, stat.st_mtime

    def temporary_files(self) -> Iterator[tuple[Path, float]]:
        """Partial writes (a crash between write and rename leaves them) with their mtime."""
        for path in self.tmp.glob("*.part"):
            yield path, path.stat().st_mtime


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
