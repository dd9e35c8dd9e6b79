"""WADO-RS: studies, series and instances as stored bytes, and their stored metadata."""

from __future__ import annotations

import asyncio
import re
import uuid

from aiohttp import web

from ricord_archive.errors import BadRequest, NotAcceptable
from ricord_archive.web import app as web_app
from ricord_archive.web.media import DICOM, DICOM_JSON, accepts, accepts_multipart_dicom

_CHUNK = 1024 * 1024
OCTET_STREAM = "application/octet-stream"


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


async def bulk_data(request: web.Request) -> web.Response:
    """multipart/related; type="application/octet-stream" with one element's value."""
    services = request.app[web_app.SERVICES]
    tag_text = request.match_info["tag"]
    if not re.fullmatch(r"[0-9A-Fa-f]{8}", tag_text):
        raise BadRequest("bulk data is addressed by an 8-digit hexadecimal tag")
    value = await services.retrieve.bulk_data(*_uids(request), int(tag_text, 16))
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Type: {OCTET_STREAM}\r\nContent-Length: {len(value)}\r\n\r\n"
    ).encode("ascii") + value + f"\r\n--{boundary}--\r\n".encode("ascii")
    return web.Response(body=body, headers={
        "Content-Type": f'multipart/related; type="{OCTET_STREAM}"; boundary={boundary}',
    })
