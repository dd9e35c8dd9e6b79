"""The retrieve service: stored bytes and stored metadata, never a re-parse."""

from __future__ import annotations

from pathlib import Path

import asyncpg

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

    async def metadata(self, *uids: str) -> bytes:
        """A DICOM JSON array of the instances in scope, assembled from stored documents."""
        documents = await instance_metadata(self.pool, *uids)
        if not documents:
            raise NotFound(f"no such {_LEVEL[len(uids) - 1]}")
        return b"[" + b",".join(documents) + b"]"
