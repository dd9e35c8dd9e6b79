"""Blobs in an S3-compatible object store (AWS S3, Ceph RGW, SeaweedFS, MinIO), through
obstore (the Rust object_store crate's bindings).

Writes use `If-None-Match: *` (obstore's create mode): an existing key is never overwritten;
large objects go up in parts. Reads are ranged: a frame or a header is fetched, not the object.
"""

from __future__ import annotations

import contextlib
import io
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, BinaryIO

import obstore
from obstore.store import S3Store

from ricord_archive.blobstore.keys import (
    PROBES,
    RECORDS,
    check_file_key,
    check_record,
    is_file_key,
    new_key,
)
from ricord_archive.blobstore.ranged import RangedFile
from ricord_archive.config import S3Config

if TYPE_CHECKING:
    from obstore.store import S3Config as ObstoreConfig

_MULTIPART_ABOVE = 64 * 1024**2  # bytes: larger objects are uploaded in parts
_READ_BUFFER = 1024**2
# An unreachable store fails a request within seconds (C-STORE 0xA700, STOW 503), not minutes.
_CONNECT_TIMEOUT = timedelta(seconds=5)
_REQUEST_TIMEOUT = timedelta(seconds=120)
_RETRY_TIMEOUT = timedelta(seconds=15)


class S3BlobStore:
    def __init__(self, config: S3Config) -> None:
        settings: ObstoreConfig = {"region": config.region,
                                   "virtual_hosted_style_request": not config.path_style}
        if config.endpoint:
            settings["endpoint"] = config.endpoint
        if config.access_key_id:
            settings["access_key_id"] = config.access_key_id
            settings["secret_access_key"] = config.secret_access_key or ""
        self._store = S3Store(
            config.bucket, prefix=config.prefix or None, config=settings,
            client_options={"allow_http": config.endpoint.startswith("http://"),
                            "connect_timeout": _CONNECT_TIMEOUT, "timeout": _REQUEST_TIMEOUT},
            retry_config={"max_retries": 3, "retry_timeout": _RETRY_TIMEOUT},
        )
        self.records = S3RecordStore(self._store)

    new_key = staticmethod(new_key)

    def write(self, key: str, data: bytes) -> None:
        with _as_os_errors():
            obstore.put(self._store, check_file_key(key), data, mode="create",
                        use_multipart=len(data) > _MULTIPART_ABOVE)

    def quick(self, key: str, size: int) -> bool:
        return False  # a request over the network

    def open(self, key: str, size: int | None = None) -> BinaryIO:
        if size is None:
            with _as_os_errors():
                size = obstore.head(self._store, check_file_key(key))["size"]
        raw = _RangeReader(self._store, check_file_key(key), size)
        return io.BufferedReader(raw, buffer_size=_READ_BUFFER)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError), _as_os_errors():  # gone already: deleted
            obstore.delete(self._store, check_file_key(key))

    def walk(self) -> Iterator[tuple[str, int, float]]:
        with _as_os_errors():
            for batch in obstore.list(self._store, chunk_size=1000):
                for meta in batch:
                    if is_file_key(meta["path"]):
                        yield meta["path"], meta["size"], meta["last_modified"].timestamp()

    def probe(self) -> None:
        with _as_os_errors():
            name = f"{PROBES}/{uuid.uuid4().hex}"
            obstore.put(self._store, name, b"ready?", mode="create")
            obstore.delete(self._store, name)


class S3RecordStore:
    """Allocation records as objects under `records/` in the blobs' bucket (an interrupted
    upload leaves no object behind: an S3 store has no temporary files)."""

    def __init__(self, store: S3Store) -> None:
        self._store = store

    def write(self, name: str, data: bytes) -> None:
        with _as_os_errors():
            obstore.put(self._store, f"{RECORDS}/{check_record(name)}", data)

    def read(self, folder: str) -> Iterator[tuple[str, bytes]]:
        with _as_os_errors():
            for batch in obstore.list(self._store, prefix=f"{RECORDS}/{folder}/"):
                for meta in batch:
                    name = meta["path"].removeprefix(f"{RECORDS}/")
                    check_record(name)
                    yield name, bytes(obstore.get(self._store, meta["path"]).bytes())


class _RangeReader(RangedFile):
    """A seekable read-only file over one object: each read is a ranged GET."""

    def __init__(self, store: S3Store, key: str, size: int) -> None:
        super().__init__(key, size)
        self._store, self._key = store, key

    def _read(self, start: int, length: int) -> bytes:
        with _as_os_errors():
            return bytes(obstore.get_range(self._store, self._key, start=start, length=length))


@contextlib.contextmanager
def _as_os_errors() -> Iterator[None]:
    """The store's errors as the OSErrors a filesystem would raise (the archive answers
    0xA700 / 503 for those); a missing object stays FileNotFoundError. The message names
    the kind of failure only (keys are ours, but responses quote no store internals)."""
    try:
        yield
    except FileNotFoundError:
        raise
    except obstore.exceptions.BaseError as exc:
        raise OSError(f"object store error ({type(exc).__name__})") from exc
