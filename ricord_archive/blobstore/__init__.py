"""Blob stores: where the bytes of stored objects live. Four verbs, like Orthanc's
IStorageArea: write, read (a seekable file: whole or by ranges), delete, list; keys generated
by the archive (`keys`, never taken from input), objects never overwritten: a new write is a
new key. Allocation records (a site's SITEID, a patient's pseudonym and date offset) live
beside the blobs in a small store of their own (`records`).

Two implementations: the local filesystem (`file`, default: blobs appended to segment files,
`segments`) and an S3-compatible object store (`s3`, one object per blob). A key that reaches
the index always names complete, durable bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from ricord_archive.blobstore.file import FileBlobStore
from ricord_archive.blobstore.s3 import S3BlobStore
from ricord_archive.blobstore.segments import Location
from ricord_archive.config import Config

__all__ = ["Blob", "BlobStore", "FileBlobStore", "RecordStore", "S3BlobStore", "open_blob_store"]


class RecordStore(Protocol):
    """Small allocation records, durable, each replaced whole: with them the index can be
    rebuilt from the store alone (`ricord-archive rebuild-index`)."""

    def write(self, name: str, data: bytes) -> None:
        """Store record `name` ('sites/...json', 'patients/...json'), replacing one of the
        same name."""

    def read(self, folder: str) -> Iterator[tuple[str, bytes]]:
        """(name, content) of every record in `folder` ('sites' or 'patients')."""


class BlobStore(Protocol):
    @property
    def records(self) -> RecordStore:
        """The allocation records kept beside the blobs."""

    def new_key(self) -> str: ...

    def write(self, key: str, data: bytes) -> None:
        """Store `data` under `key` (a new key from `new_key`, written once); returns when
        the bytes are durable against power loss."""

    def quick(self, key: str, size: int) -> bool:
        """Whether writing `size` bytes under `key` takes so little (a small local write and
        its flush) that the caller may do it on its event loop instead of in a thread."""

    def open(self, key: str, size: int | None = None) -> BinaryIO:
        """The blob as a seekable binary file, read whole or by ranges (`size`, when known,
        saves a request)."""

    def delete(self, key: str) -> None: ...

    def walk(self) -> Iterator[tuple[str, int, float]]:
        """(key, size, modification time) of every blob."""

    def probe(self) -> None:
        """Write a few bytes and remove them (readiness): OSError when the store cannot
        take new blobs."""


@dataclass(frozen=True)
class Blob:
    """One stored object's bytes, wherever they are."""

    store: BlobStore
    key: str
    size: int | None = None

    def open(self) -> BinaryIO:
        return self.store.open(self.key, self.size)

    def read(self) -> bytes:
        """The whole object (blocking: call it from a thread)."""
        with self.open() as stream:
            return stream.read()

    @property
    def local(self) -> Location | None:
        """The file and offset of the bytes when they are on a local filesystem (sendfile)."""
        return self.store.local_file(self.key) if isinstance(self.store, FileBlobStore) else None


def open_blob_store(config: Config) -> BlobStore:
    """The configured blob store: `[blobs]` S3 settings, else `<data-dir>/blobs`."""
    if config.s3 is not None:
        return S3BlobStore(config.s3)
    return FileBlobStore(config.data_dir / "blobs", config.limits.blob_segment_bytes)
