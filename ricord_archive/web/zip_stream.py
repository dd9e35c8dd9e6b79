"""A ZIP (zip_layout) sent over HTTP: exact Content-Length before the first byte, stored bytes
from the blob store (sendfile from local files, ranged reads otherwise), memory flat whatever
the size; one byte range (`Range`, `If-Range`) answered 206 when every CRC is known up front."""

from __future__ import annotations

import asyncio
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web

from ricord_archive.blobstore import Blob
from ricord_archive.dicom.zip_layout import DataSlice, ZipLayout
from ricord_archive.web.sendfile import sendfile

ZIP = "application/zip"
_CHUNK = 1024 * 1024
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """[start, stop) of a single `Range: bytes=a-b` (a-, -n too) within `size`; None for no
    range or one this answer ignores (several ranges: the whole is sent); 416 when it lies
    outside."""
    if header is None:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None or not (match.group(1) or match.group(2)):
        return None
    first, last = match.group(1), match.group(2)
    if first:
        start, stop = int(first), min(int(last) + 1, size) if last else size
    else:
        start, stop = max(0, size - int(last)), size
    if start >= size or start >= stop:
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    return start, stop


def _chosen_range(request: web.Request, layout: ZipLayout, etag: str | None
                  ) -> tuple[int, int] | None:
    if etag is None or any(e.crc is None for e in layout.entries):
        return None  # a data descriptor's CRC is known only to a stream from the start
    if_range = request.headers.get("If-Range")
    if if_range is not None and if_range.strip() != etag:
        return None  # the archive changed since the client's first part: send it whole
    return byte_range(request.headers.get("Range"), layout.size)


async def _read_slice(response: web.StreamResponse, blob: Blob, offset: int, length: int,
                      crc: int | None) -> int | None:
    """Send `length` bytes of the blob from `offset` through Python, updating `crc` (None:
    not tracked)."""
    with await asyncio.to_thread(blob.open) as handle:
        await asyncio.to_thread(handle.seek, offset)
        left = length
        while left > 0:
            chunk = await asyncio.to_thread(handle.read, min(_CHUNK, left))
            if not chunk:
                raise OSError("a stored object is shorter than the index says")
            if crc is not None:
                crc = zlib.crc32(chunk, crc)
            await response.write(chunk)
            left -= len(chunk)
    return crc


@dataclass
class Tally:
    """Bytes of the archive sent so far (for the audit trail, even when the client left)."""

    sent: int = 0


async def send_zip(request: web.Request, layout: ZipLayout, sources: Sequence[Blob | bytes],
                   filename: str, etag: str | None = None, tally: Tally | None = None
                   ) -> web.StreamResponse:
    """Stream the archive (or the one range asked, when `etag` is given and every CRC is known
    up front)."""
    tally = tally or Tally()
    chosen = _chosen_range(request, layout, etag)
    start, stop = chosen or (0, layout.size)
    response = web.StreamResponse(status=206 if chosen else 200, headers={
        "Content-Type": ZIP, "Content-Disposition": f'attachment; filename="{filename}"',
        **({"Accept-Ranges": "bytes", "ETag": etag} if etag else {"Accept-Ranges": "none"}),
        **({"Content-Range": f"bytes {start}-{stop - 1}/{layout.size}"} if chosen else {}),
    })
    response.content_length = stop - start
    await response.prepare(request)
    if request.method == "HEAD":
        await response.write_eof()
        return response
    crcs: dict[int, int] = {}
    for part in layout.slices(start, stop, lambda i: crcs.get(i, 0)):
        if not isinstance(part, DataSlice):
            await response.write(part)
            tally.sent += len(part)
            continue
        source = sources[part.index]
        if isinstance(source, bytes):
            await response.write(source[part.offset:part.offset + part.length])
            tally.sent += part.length
            continue
        tracked = layout.entries[part.index].crc is None
        local = None if tracked or request.transport is None else source.local
        if local is not None:
            with local.path.open("rb") as handle:
                await sendfile(request, handle, local.offset + part.offset, part.length)
        else:
            crc = await _read_slice(response, source, part.offset, part.length,
                                    crcs.get(part.index, 0) if tracked else None)
            if crc is not None:
                crcs[part.index] = crc
        tally.sent += part.length
    await response.write_eof()
    return response
