"""The retrieve service: stored bytes and stored metadata, never a re-parse."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pydicom

from ricord_archive.blobstore import BlobStore
from ricord_archive.errors import NotFound
from ricord_archive.index.reads import StoredInstance, instance_metadata, stored_instances

_LEVEL = ("study", "series", "instance")


class RetrieveService:
    def __init__(self, pool: asyncpg.Pool, blobs: BlobStore) -> None:
        self.pool = pool
        self.blobs = blobs

    async def instances(self, *uids: str) -> list[tuple[StoredInstance, Path]]:
        """The stored instances in scope with their files; NotFound when there are none."""
        found = await stored_instances(self.pool, *uids)
        if not found:
            raise NotFound(f"no such {_LEVEL[len(uids) - 1]}")
        return [(item, self.blobs.path(item.blob_key)) for item in found]

    async def bulk_data(self, study: str, series: str, instance: str, tag: int) -> bytes:
        """The value of one binary element of a stored instance, as handed out by BulkDataURI."""
        [(_, path)] = await self.instances(study, series, instance)
        value = await asyncio.to_thread(_element_bytes, path, tag)
        if value is None:
            raise NotFound("no such bulk data element")
        return value

    async def metadata(self, *uids: str) -> bytes:
        """A DICOM JSON array of the instances in scope, assembled from stored documents."""
        documents = await instance_metadata(self.pool, *uids)
        if not documents:
            raise NotFound(f"no such {_LEVEL[len(uids) - 1]}")
        return b"[" + b",".join(documents) + b"]"


def _element_bytes(path: Path, tag: int) -> bytes | None:
    dataset = pydicom.dcmread(path, specific_tags=[tag])
    element = dataset.get(tag)
    if element is None or not isinstance(element.value, bytes):
        return None
    return element.value
