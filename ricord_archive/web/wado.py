"""WADO-RS: studies, series and instances as stored bytes, and their stored metadata."""

from __future__ import annotations

import asyncio
import uuid

from aiohttp import web

from ricord_archive.errors import NotAcceptable
from ricord_archive.web import app as web_app
from ricord_archive.web.media import DICOM, DICOM_JSON, accepts, accepts_multipart_dicom

_CHUNK = 1024 * 1024


def _uids(request: web.Request) -> tuple[str, ...]:
    info = request.match_info
    return tuple(info[k] for k in ("study", "series", "instance") if k in info)


async def retrieve(request: web.Request) -> web.StreamResponse:
    """multipart/related; type="application/dicom", one part per instance, streamed from disk."""
    services = request.app[web_app.SERVICES]
    if not accepts_multipart_dicom(request.headers.get("Accept")):
        raise NotAcceptable('served as multipart/related; type="application/dicom" only')
    found = await services.retrieve.instances(*_uids(request))
    boundary = uuid.uuid4().hex
    response = web.StreamResponse(headers={
        "Content-Type": f'multipart/related; type="{DICOM}"; boundary={boundary}',
    })
    await response.prepare(request)
    for item, path in found:
        head = (
            f"--{boundary}\r\nContent-Type: {DICOM}; transfer-syntax={item.transfer_syntax_uid}"
            f"\r\nContent-Length: {item.size_bytes}\r\n\r\n"
        )
        await response.write(head.encode("ascii"))
        with path.open("rb") as handle:
            while chunk := await asyncio.to_thread(handle.read, _CHUNK):
                await response.write(chunk)
        await response.write(b"\r\n")
    await response.write(f"--{boundary}--\r\n".encode("ascii"))
    await response.write_eof()
    return response


async def metadata(request: web.Request) -> web.Response:
    services = request.app[web_app.SERVICES]
    if not accepts(request.headers.get("Accept"), DICOM_JSON, "application/json"):
        raise NotAcceptable("metadata is served as application/dicom+json")
    body = await services.retrieve.metadata(*_uids(request))
    return web.Response(body=body, content_type=DICOM_JSON)
