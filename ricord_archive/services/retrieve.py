"""The retrieve service: stored bytes and stored metadata; frames read at their offsets;
decoding and re-encoding only when the client asks for what is not stored."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from io import BytesIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

from ricord_archive.blobstore import Blob, BlobStore
from ricord_archive.dicom import pixels
from ricord_archive.dicom.io import pixel_data_location
from ricord_archive.dicom.rendering import RenderOptions, render
from ricord_archive.errors import BadRequest, NotAcceptable, NotFound
from ricord_archive.index.database import reporting_outages
from ricord_archive.index.facade import Index
from ricord_archive.instances import StoredInstance

_LEVEL = ("study", "series", "instance")
__all__ = ["Blob", "Frames", "RetrieveService"]


@dataclass(frozen=True)
class Frames:
    """Frames of one instance: as stored (`media_type` of the stored syntax) or decoded."""

    data: list[bytes]
    media_type: str
    transfer_syntax_uid: str | None  # None: uncompressed native pixel bytes


class RetrieveService:
    def __init__(self, index: Index, blobs: BlobStore) -> None:
        self.index = index  # metadata from its read replica when configured, the rest not
        self.blobs = blobs

    async def instances(
        self, *uids: str, site_id: int | None = None
    ) -> list[tuple[StoredInstance, Blob]]:
        """The stored instances in scope with their blobs; NotFound when there are none.
        With `site_id`, another site's objects are as if they did not exist."""
        async with reporting_outages():
            found = await self.index.stored_instances(*uids, site_id=site_id)
        if not found:
            raise NotFound(f"no such {_LEVEL[len(uids) - 1]}")
        return [(item, self._blob(item)) for item in found]

    async def instance(
        self, *uids: str, site_id: int | None = None
    ) -> tuple[StoredInstance, Blob]:
        [found] = await self.instances(*uids, site_id=site_id)
        return found

    async def in_scopes(
        self, scopes: Sequence[tuple[str, ...]]
    ) -> list[tuple[StoredInstance, Blob]]:
        """The stored instances of several studies, series or instances (each scope 1 to 3 UIDs,
        as for `instances`), each once, in retrieval order; unknown scopes add nothing.
        Instances of one series are read together."""
        found: dict[str, StoredInstance] = {}
        members: dict[tuple[str, ...], set[str]] = {}
        for scope in scopes:
            if len(scope) == 3:
                members.setdefault(scope[:2], set()).add(scope[2])
            else:
                for item in await self.index.stored_instances(*scope):
                    found.setdefault(item.sop_uid, item)
        for series, sop_uids in members.items():
            for item in await self.index.stored_instances(*series):
                if item.sop_uid in sop_uids:
                    found.setdefault(item.sop_uid, item)
        return [(item, self._blob(item)) for item in found.values()]

    def _blob(self, item: StoredInstance) -> Blob:
        return Blob(self.blobs, item.blob_key, item.size_bytes)

    async def for_sending(
        self, item: StoredInstance, blob: Blob, accepted: Collection[str]
    ) -> Dataset:
        """The instance as a dataset to send (DIMSE) in one of the `accepted` transfer syntaxes:
        read as stored when its stored syntax is accepted (its encoded elements are sent as
        they are), else re-encoded in an accepted uncompressed syntax; NotAcceptable when
        neither is possible."""
        target = pixels.choose_transfer_syntax(item.transfer_syntax_uid, accepted)
        if target is None:
            raise NotAcceptable("no accepted transfer syntax can be produced from this object")
        if target == item.transfer_syntax_uid:
            return await asyncio.to_thread(_read, blob)
        data = await self.transcoded(blob, target)
        return await asyncio.to_thread(pydicom.dcmread, BytesIO(data))

    async def stored_bytes(self, blob: Blob) -> bytes:
        """The object as stored."""
        return await asyncio.to_thread(blob.read)

    async def transcoded(self, blob: Blob, transfer_syntax: str) -> bytes:
        """The whole object re-encoded in `transfer_syntax` (406 when it cannot be)."""
        return await asyncio.to_thread(_transcode, blob, transfer_syntax)

    async def frames(self, uids: tuple[str, str, str], numbers: list[int], stored: bool,
                     site_id: int | None = None) -> Frames:
        """Frames by number (1-based): the stored bytes when `stored` (compressed frames stay
        compressed), else decoded to native little-endian pixel values."""
        item, blob = await self.instance(*uids, site_id=site_id)
        if item.rows is None or item.columns is None:
            raise BadRequest("the instance has no pixel data")
        pixels.check_frame_numbers(numbers, item.number_of_frames)
        syntax = UID(item.transfer_syntax_uid)
        if stored and syntax.is_compressed:
            data = await asyncio.to_thread(self._encapsulated, item, blob, numbers)
            return Frames(data, pixels.FRAME_MEDIA_TYPES.get(syntax, "application/octet-stream"),
                          str(syntax))
        if not syntax.is_compressed and syntax.is_little_endian:
            data = await asyncio.to_thread(self._native, item, blob, numbers)
        else:
            data = await asyncio.to_thread(_decode, blob, numbers)
        return Frames(data, "application/octet-stream", None)

    async def rendered(self, uids: tuple[str, str, str], number: int,
                       options: RenderOptions, site_id: int | None = None) -> bytes:
        item, blob = await self.instance(*uids, site_id=site_id)
        if item.rows is None:
            raise BadRequest("the instance has no pixel data to render")
        pixels.check_frame_numbers([number], item.number_of_frames)
        return await asyncio.to_thread(_render, blob, number, options)

    async def thumbnail(self, uids: tuple[str, ...], options: RenderOptions,
                        site_id: int | None = None) -> bytes:
        """The middle image of a study or series (its middle frame), or of one instance."""
        found = [(i, p) for i, p in await self.instances(*uids, site_id=site_id)
                 if i.rows is not None]
        if not found:
            raise NotFound("nothing with pixel data to show")
        item, blob = found[len(found) // 2]
        return await asyncio.to_thread(_render, blob, (item.number_of_frames + 1) // 2, options)

    async def bulk_data(self, study: str, series: str, instance: str, tag: int,
                        site_id: int | None = None) -> bytes:
        """The value of one binary element of a stored instance, as handed out by BulkDataURI."""
        _, blob = await self.instance(study, series, instance, site_id=site_id)
        value = await asyncio.to_thread(_element_bytes, blob, tag)
        if value is None:
            raise NotFound("no such bulk data element")
        return value

    async def metadata(self, *uids: str, site_id: int | None = None) -> bytes:
        """A DICOM JSON array of the instances in scope, assembled from stored documents."""
        async with reporting_outages():
            documents = await self.index.instance_metadata(*uids, site_id=site_id)
        if not documents:
            raise NotFound(f"no such {_LEVEL[len(uids) - 1]}")
        return b"[" + b",".join(documents) + b"]"

    @staticmethod
    def _offset(item: StoredInstance, blob: Blob) -> tuple[int, int | None]:
        if item.pixel_data_offset is not None:
            return item.pixel_data_offset, item.pixel_data_length
        with blob.open() as stream:  # indexed before offsets were recorded
            location = pixel_data_location(stream)
        if location is None:
            raise NotFound("the instance has no pixel data")
        return location.offset, location.length

    def _native(self, item: StoredInstance, blob: Blob, numbers: list[int]) -> list[bytes]:
        offset, _ = self._offset(item, blob)
        assert item.rows is not None and item.columns is not None  # checked by frames()
        size = pixels.frame_size(item.rows, item.columns, item.samples_per_pixel or 1,
                                 item.bits_allocated or 8)
        with blob.open() as stream:
            return [pixels.native_frame(stream, offset, size, n) for n in numbers]

    def _encapsulated(self, item: StoredInstance, blob: Blob, numbers: list[int]) -> list[bytes]:
        offset, _ = self._offset(item, blob)
        big = not UID(item.transfer_syntax_uid).is_little_endian
        with blob.open() as stream:
            found = pixels.encapsulated_frames(stream, offset, item.number_of_frames, numbers, big)
        missing = [n for n in numbers if n not in found]
        if missing:
            raise NotFound(f"frame {missing[0]} is not in the stored pixel data")
        return [found[n] for n in numbers]


def _read(blob: Blob) -> Dataset:
    with blob.open() as stream:
        return pydicom.dcmread(stream)


def _transcode(blob: Blob, transfer_syntax: str) -> bytes:
    with blob.open() as stream:
        return pixels.transcode(stream, transfer_syntax)


def _decode(blob: Blob, numbers: list[int]) -> list[bytes]:
    with blob.open() as stream:
        return [pixels.as_little_endian_bytes(pixels.decoded_frame(stream, n)) for n in numbers]


def _render(blob: Blob, number: int, options: RenderOptions) -> bytes:
    with blob.open() as stream:
        attributes = pydicom.dcmread(stream, stop_before_pixels=True)
        stream.seek(0)
        return render(pixels.decoded_frame(stream, number), attributes, options)


def _element_bytes(blob: Blob, tag: int) -> bytes | None:
    with blob.open() as stream:
        dataset = pydicom.dcmread(stream, specific_tags=[tag])
    element = dataset.get(tag)
    if element is None or not isinstance(element.value, bytes):
        return None
    return element.value
