"""WADO-RS (instances, metadata, frames, bulk data, rendered, thumbnail) and WADO-URI."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import uuid
from collections.abc import Iterable

from aiohttp import web
from pydicom.uid import ExplicitVRLittleEndian

from ricord_archive.dicom.json import instance_path
from ricord_archive.dicom.pixels import STORED, choose_transfer_syntax, parse_frame_list
from ricord_archive.dicom.rendering import MEDIA_TYPES, parse_options
from ricord_archive.dicom.uids import is_uid
from ricord_archive.errors import BadRequest, NotAcceptable
from ricord_archive.instances import StoredInstance
from ricord_archive.web import auth, context, zip_stream
from ricord_archive.web.media import (
    DICOM,
    DICOM_JSON,
    MediaRange,
    accepts,
    parse_accept,
)
from ricord_archive.web.sendfile import sendfile

log = logging.getLogger(__name__)

_CHUNK = 1024 * 1024
OCTET_STREAM = "application/octet-stream"


def _uids(request: web.Request) -> tuple[str, ...]:
    info = request.match_info
    uids = tuple(info[k] for k in ("study", "series", "instance") if k in info)
    for uid in uids:
        if not is_uid(uid):
            raise BadRequest("a UID is digits and dots, at most 64 characters")
    return uids


def _instance_uids(request: web.Request) -> tuple[str, str, str]:
    """The study, series and instance UIDs of an instance route."""
    study, series, instance = _uids(request)
    return study, series, instance


def _multipart_types(accept: str | None, part_type: str) -> list[MediaRange]:
    """The media ranges of `accept` that admit multipart/related parts of `part_type`."""
    found = []
    for media in parse_accept(accept):
        if media.type == "*/*":
            found.append(MediaRange("multipart/related", {"type": part_type}))
        elif media.type == "multipart/related" and media.params.get("type", part_type) in (
            part_type, "*/*", "application/*",
        ):
            found.append(media)
    return found


def _dicom_syntaxes(accept: str | None) -> list[str]:
    """Acceptable transfer syntaxes for application/dicom parts, in the client's order;
    no transfer-syntax parameter means Explicit VR Little Endian (PS3.18 8.7.3.5.2)."""
    ranges = _multipart_types(accept, DICOM)
    if not ranges:
        raise NotAcceptable('served as multipart/related; type="application/dicom" only')
    return [m.params.get("transfer-syntax", ExplicitVRLittleEndian) for m in ranges]


def _choose(item: StoredInstance, syntaxes: list[str]) -> str:
    chosen = choose_transfer_syntax(item.transfer_syntax_uid, syntaxes)
    if chosen is None:
        raise NotAcceptable(f"cannot produce any of the requested transfer syntaxes from "
                            f"{item.transfer_syntax_uid}")
    return chosen


async def _part(response: web.StreamResponse, boundary: str, headers: str, body: bytes) -> None:
    await response.write(f"--{boundary}\r\n{headers}\r\n\r\n".encode("ascii") + body + b"\r\n")


def _wants_zip(accept: str | None) -> bool:
    """Whether the first media range of `accept` that this answers is application/zip."""
    for media in parse_accept(accept):
        if media.type == zip_stream.ZIP:
            return True
        if media.type in ("*/*", "multipart/related"):
            return False
    return False


async def _retrieve_zip(request: web.Request) -> web.StreamResponse:
    """A study or series as one ZIP of its stored objects (as dcm4chee offers), in the
    layout of a cohort's ZIP."""
    services = request.app[context.SERVICES]
    uids = _uids(request)
    if len(uids) == 3 or services.cohorts is None:
        raise NotAcceptable("a ZIP is offered for a study or a series")
    found = await services.retrieve.instances(*uids, site_id=auth.site_id(request))
    layout, sources = await services.cohorts.instances_archive(found)
    return await zip_stream.send_zip(request, layout, sources, f"{uids[-1]}.zip")


async def retrieve(request: web.Request) -> web.StreamResponse:
    """multipart/related; type="application/dicom", one part per instance: stored bytes
    sent from disk with sendfile (from an object store in ranged reads), or the object
    re-encoded when another transfer syntax is asked for; or a ZIP (Accept: application/zip)."""
    services = request.app[context.SERVICES]
    if _wants_zip(request.headers.get("Accept")):
        return await _retrieve_zip(request)
    syntaxes = _dicom_syntaxes(request.headers.get("Accept"))
    found = await services.retrieve.instances(*_uids(request), site_id=auth.site_id(request))
    chosen = [_choose(item, syntaxes) for item, _ in found]  # 406 before anything is sent
    boundary = uuid.uuid4().hex
    response = web.StreamResponse(headers={
        "Content-Type": f'multipart/related; type="{DICOM}"; boundary={boundary}',
    })
    closing = f"--{boundary}--\r\n".encode("ascii")
    heads = [
        f"--{boundary}\r\nContent-Type: {DICOM}; transfer-syntax={syntax}\r\n"
        f"Content-Length: {item.size_bytes}\r\n\r\n".encode("ascii")
        for (item, _), syntax in zip(found, chosen, strict=True)
    ]
    as_stored = all(syntax == item.transfer_syntax_uid
                    for (item, _), syntax in zip(found, chosen, strict=True))
    if as_stored:  # the length is known: no chunked encoding, so files go out by sendfile
        response.content_length = sum(
            len(head) + item.size_bytes + 2 for head, (item, _) in zip(heads, found, strict=True)
        ) + len(closing)
    await response.prepare(request)
    for head, (item, blob), syntax in zip(heads, found, chosen, strict=True):
        if syntax == item.transfer_syntax_uid:
            await response.write(head)
            # a local file opens at once; an object store's answers over the network
            local = blob.local if as_stored and request.transport is not None else None
            if local is not None:
                with local.path.open("rb") as handle:
                    await sendfile(request, handle, local.offset, item.size_bytes)
            else:
                with await asyncio.to_thread(blob.open) as handle:
                    while chunk := await asyncio.to_thread(handle.read, _CHUNK):
                        await response.write(chunk)
            await response.write(b"\r\n")
        else:
            body = await services.retrieve.transcoded(blob, syntax)
            await _part(response, boundary, f"Content-Type: {DICOM}; transfer-syntax={syntax}\r\n"
                        f"Content-Length: {len(body)}", body)
    await response.write(closing)
    await response.write_eof()
    return response


def _multipart_body(parts: Iterable[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """Parts of (media type, Content-Location, bytes): each part names the URI it answers
    (PS3.18 10.4.3.3.5: bulk data carries the BulkDataURI of its element in the metadata)."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        f"--{boundary}\r\nContent-Type: {content_type}\r\nContent-Location: {location}\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode("ascii") + data + b"\r\n"
        for content_type, location, data in parts
    ) + f"--{boundary}--\r\n".encode("ascii")
    return body, boundary


async def frames(request: web.Request) -> web.Response:
    """Frames as stored (compressed stays compressed) when the client accepts that, else
    decoded to uncompressed pixel values (application/octet-stream)."""
    services = request.app[context.SERVICES]
    uids = _instance_uids(request)
    numbers = parse_frame_list(request.match_info["frames"])
    ranges = [m for m in parse_accept(request.headers.get("Accept"))
              if m.type in ("*/*", "multipart/related")]
    if not ranges:
        raise NotAcceptable("frames are served as multipart/related")
    types = {m.params.get("type", "*/*") for m in ranges}
    any_stored = "*/*" in types or any(m.params.get("transfer-syntax") == STORED for m in ranges)
    site_id = auth.site_id(request)
    result = await services.retrieve.frames(uids, numbers, stored=True, site_id=site_id)
    if not (any_stored or result.media_type in types or result.transfer_syntax_uid in {
        m.params.get("transfer-syntax") for m in ranges
    }):
        if OCTET_STREAM not in types:
            raise NotAcceptable("frames are available as stored or as application/octet-stream")
        result = await services.retrieve.frames(uids, numbers, stored=False, site_id=site_id)
    part_type = result.media_type + (
        f"; transfer-syntax={result.transfer_syntax_uid}" if result.transfer_syntax_uid else ""
    )
    instance = instance_path(*uids)
    body, boundary = _multipart_body(
        (part_type, f"{instance}/frames/{number}", data)
        for number, data in zip(numbers, result.data, strict=True)
    )
    return web.Response(body=body, headers={
        "Content-Type": f'multipart/related; type="{result.media_type}"; boundary={boundary}',
    })


def _render_type(request: web.Request) -> str:
    for media in parse_accept(request.headers.get("Accept")):
        if media.type in MEDIA_TYPES:
            return media.type
        if media.type in ("*/*", "image/*"):
            return "image/jpeg"
    raise NotAcceptable("rendered images are image/jpeg or image/png")


async def rendered(request: web.Request) -> web.Response:
    services = request.app[context.SERVICES]
    options = parse_options(dict(request.query), _render_type(request))
    numbers = parse_frame_list(request.match_info.get("frames", "1"))
    if len(numbers) != 1:
        raise BadRequest("one frame is rendered at a time")
    body = await services.retrieve.rendered(
        _instance_uids(request), numbers[0], options, site_id=auth.site_id(request)
    )
    return web.Response(body=body, content_type=options.media_type)


async def thumbnail(request: web.Request) -> web.Response:
    services = request.app[context.SERVICES]
    params = {"viewport": "128,128", **dict(request.query)}
    options = parse_options(params, _render_type(request))
    body = await services.retrieve.thumbnail(_uids(request), options, site_id=auth.site_id(request))
    return web.Response(body=body, content_type=options.media_type)


async def metadata(request: web.Request) -> web.Response:
    """Stored DICOM JSON with an ETag (304 on If-None-Match), gzip when accepted."""
    services = request.app[context.SERVICES]
    if not accepts(request.headers.get("Accept"), DICOM_JSON, "application/json"):
        raise NotAcceptable("metadata is served as application/dicom+json")
    body = await services.retrieve.metadata(*_uids(request), site_id=auth.site_id(request))
    etag = '"' + hashlib.blake2b(body, digest_size=16).hexdigest() + '"'
    if etag in {t.strip() for t in request.headers.get("If-None-Match", "").split(",")}:
        return web.Response(status=304, headers={"ETag": etag})
    response = web.Response(body=body, content_type=DICOM_JSON, headers={"ETag": etag})
    if "gzip" in request.headers.get("Accept-Encoding", ""):
        response.enable_compression(web.ContentCoding.gzip)
    return response


_BYTE_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


async def bulk_data(request: web.Request) -> web.Response:
    """One element's value as multipart/related; type="application/octet-stream"; a single
    `Range: bytes=a-b` is honoured (206)."""
    services = request.app[context.SERVICES]
    tag_text = request.match_info["tag"]
    if not re.fullmatch(r"[0-9A-Fa-f]{8}", tag_text):
        raise BadRequest("bulk data is addressed by an 8-digit hexadecimal tag")
    uids = _instance_uids(request)
    value = await services.retrieve.bulk_data(*uids, int(tag_text, 16),
                                              site_id=auth.site_id(request))
    status, extra = 200, {}
    wanted = request.headers.get("Range")
    if wanted:
        unsatisfiable = web.HTTPRequestRangeNotSatisfiable(
            headers={"Content-Range": f"bytes */{len(value)}"}
        )
        match = _BYTE_RANGE.fullmatch(wanted.strip())
        if not match or not (match.group(1) or match.group(2)):
            raise unsatisfiable
        start, end = match.group(1), match.group(2)
        first = int(start) if start else max(0, len(value) - int(end))
        last = min(int(end), len(value) - 1) if start and end else len(value) - 1
        if first >= len(value) or first > last:
            raise unsatisfiable
        status = 206
        extra["Content-Range"] = f"bytes {first}-{last}/{len(value)}"
        value = value[first:last + 1]
    location = f"{instance_path(*uids)}/bulkdata/{tag_text.upper()}"  # as in the metadata
    body, boundary = _multipart_body([(OCTET_STREAM, location, value)])
    return web.Response(status=status, body=body, headers={
        "Content-Type": f'multipart/related; type="{OCTET_STREAM}"; boundary={boundary}', **extra,
    })


async def wado_uri(request: web.Request) -> web.StreamResponse:
    """WADO-URI (PS3.18 chapter 9): one object as application/dicom or rendered."""
    services = request.app[context.SERVICES]
    query = request.query
    if query.get("requestType") != "WADO":
        raise BadRequest("requestType must be WADO")
    try:
        uids = (query["studyUID"], query["seriesUID"], query["objectUID"])
    except KeyError as exc:
        raise BadRequest("studyUID, seriesUID and objectUID are required") from exc
    for uid in uids:
        if not is_uid(uid):
            raise BadRequest("a UID is digits and dots, at most 64 characters")
    content_type = query.get("contentType", "image/jpeg").split(",")[0].strip()
    site_id = auth.site_id(request)
    if content_type == DICOM:
        item, blob = await services.retrieve.instance(*uids, site_id=site_id)
        syntax = query.get("transferSyntax")
        if syntax is None or syntax == item.transfer_syntax_uid:
            local = blob.local
            if local is None:
                return web.Response(body=await services.retrieve.stored_bytes(blob),
                                    content_type=DICOM)
            response = web.StreamResponse(headers={"Content-Type": DICOM})
            response.content_length = item.size_bytes
            await response.prepare(request)
            with local.path.open("rb") as handle:
                await sendfile(request, handle, local.offset, item.size_bytes)
            await response.write_eof()
            return response
        return web.Response(body=await services.retrieve.transcoded(blob, syntax),
                            content_type=DICOM)
    if content_type not in MEDIA_TYPES:
        raise NotAcceptable("contentType is application/dicom, image/jpeg or image/png")
    params = {"quality": query.get("imageQuality", "")}
    if query.get("windowCenter") and query.get("windowWidth"):
        params["window"] = f"{query['windowCenter']},{query['windowWidth']}"
    if query.get("columns") or query.get("rows"):
        params["viewport"] = f"{query.get('columns') or 8192},{query.get('rows') or 8192}"
    options = parse_options(params, content_type)
    number = parse_frame_list(query.get("frameNumber", "1"))[0]
    body = await services.retrieve.rendered(uids, number, options, site_id=site_id)
    return web.Response(body=body, content_type=content_type)
