"""STOW-RS: POST /studies[/{study}] with multipart/related; type="application/dicom"."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TypeVar

import orjson
from aiohttp import BodyPartReader, web

from ricord_archive.dicom.status import UNABLE_TO_PROCESS
from ricord_archive.errors import (
    ArchiveError,
    BadRequest,
    ObjectTooLarge,
    StorageUnavailable,
    UnsupportedMediaType,
)
from ricord_archive.runtime import metrics
from ricord_archive.web import auth, context, http_audit, multipart
from ricord_archive.web.media import DICOM, DICOM_JSON, parse_media_type

log = logging.getLogger(__name__)

_REFERENCED_SOP_SEQUENCE = "00081199"
_FAILED_SOP_SEQUENCE = "00081198"
_IN_FLIGHT = 4  # parts of one request being ingested at once


T = TypeVar("T")


class _Stalled(Exception):
    """The client sent no byte of the body for the configured idle timeout."""


def _uid(value: str | None) -> dict:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


async def _unless_idle(read: Awaitable[T], seconds: float) -> T:
    """One read of the body. Reads return as soon as some bytes arrived, so a read taking
    `seconds` means the client sent nothing for that long."""
    try:
        async with asyncio.timeout(seconds):
            return await read
    except TimeoutError:
        raise _Stalled from None


async def _read_part(part: BodyPartReader, remaining: int, idle: float) -> bytes:
    chunks, size = [], 0
    while chunk := await _unless_idle(part.read_chunk(1024 * 1024), idle):
        size += len(chunk)
        if size > remaining:
            raise ObjectTooLarge("the STOW-RS request exceeds the configured size limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def _ingest_part(
    request: web.Request, data: bytes, site: str, target_study: str | None, base: str
) -> tuple[dict, bool]:
    """One part through the ingest: (its ReferencedSOPSequence item, True) when stored, else
    (its FailedSOPSequence item, False). StorageUnavailable escapes: it fails the request."""
    services = request.app[context.SERVICES]
    try:
        result = await metrics.ingesting("stow_rs", site, services.ingest.store(
            data, site, target_study, by=http_audit.actor(request), protocol="STOW-RS",
        ))
    except StorageUnavailable:
        raise
    except ArchiveError as exc:
        log.info("STOW-RS object refused: %s", exc.message)
        return {
            "00081150": _uid(exc.sop_class_uid),
            "00081155": _uid(exc.sop_uid),
            "00081197": {"vr": "US", "Value": [exc.failure_reason]},
        }, False
    url = f"{base}/studies/{result.study_uid}/series/{result.series_uid}" \
          f"/instances/{result.sop_uid}"
    item = {
        "00081150": _uid(result.sop_class_uid),
        "00081155": _uid(result.sop_uid),
        "00081190": {"vr": "UR", "Value": [url]},
    }
    if result.warning:
        item["00081196"] = {"vr": "US", "Value": [result.warning]}  # WarningReason
    return item, True


_NOT_DICOM = ({
    "00081150": _uid(None),
    "00081155": _uid(None),
    "00081197": {"vr": "US", "Value": [UNABLE_TO_PROCESS]},
}, False)


async def store(request: web.Request) -> web.Response:
    services = request.app[context.SERVICES]
    content_type = parse_media_type(request.headers.get("Content-Type", ""))
    # Without `type`, each part's own Content-Type says what it is (application/dicom if none).
    if content_type.type != "multipart/related" or content_type.params.get(
        "type", DICOM
    ).lower() != DICOM:
        raise UnsupportedMediaType(
            'STOW-RS accepts multipart/related; type="application/dicom" only'
        )
    try:
        reader = multipart.reader(request)
    except (ValueError, AssertionError) as exc:
        raise BadRequest("malformed multipart body: no usable boundary parameter") from exc
    base = context.base_url(request)
    target_study = request.match_info.get("study")
    budget = services.max_stow_bytes
    site = auth.upload_site(request, services.default_site)
    idle = services.body_idle_timeout
    # Parts are ingested while the next ones are read, at most _IN_FLIGHT at once (so at most
    # that many objects are in memory); the answer lists them in the order they came.
    in_flight = asyncio.Semaphore(_IN_FLIGHT)
    entries: list[tuple[dict, bool] | asyncio.Task[tuple[dict, bool]]] = []
    tasks: list[asyncio.Task[tuple[dict, bool]]] = []
    try:
        while (part := await _unless_idle(reader.next(), idle)) is not None:
            if not isinstance(part, BodyPartReader):
                raise BadRequest("nested multipart bodies are not accepted")
            data = await _read_part(part, budget, idle)
            budget -= len(data)
            if parse_media_type(part.headers.get("Content-Type", DICOM)).type != DICOM:
                entries.append(_NOT_DICOM)
                continue
            await in_flight.acquire()
            task = asyncio.create_task(_ingest_part(request, data, site, target_study, base))
            task.add_done_callback(lambda _: in_flight.release())
            entries.append(task)
            tasks.append(task)
        outcomes = [entry if isinstance(entry, tuple) else await entry for entry in entries]
    except ValueError as exc:  # aiohttp's multipart parser on a broken body
        raise BadRequest("malformed multipart body") from exc
    except _Stalled:
        log.warning("STOW-RS body stalled for %g s: request ended after %d parts",
                    idle, len(entries))
        response = web.Response(status=408, text="the request body stalled")
        response.force_close()
        return response
    finally:
        if tasks:  # whatever happens to the request, no object is left half-stored
            await asyncio.wait(tasks)
    if not outcomes:
        raise BadRequest("the multipart body holds no part")
    stored = [item for item, ok in outcomes if ok]
    failed = [item for item, ok in outcomes if not ok]
    warned = any("00081196" in item for item in stored)
    body: dict = {}
    if stored:
        study_uids = {item["00081190"]["Value"][0].split("/series/")[0] for item in stored}
        if len(study_uids) == 1:
            body["00081190"] = {"vr": "UR", "Value": [study_uids.pop()]}
        body[_REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": stored}
    if failed:
        body[_FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": failed}
    status = 409 if failed and not stored else 202 if failed or warned else 200
    return web.Response(body=orjson.dumps(body), status=status, content_type=DICOM_JSON)
