"""STOW-RS: POST /studies[/{study}] with multipart/related; type="application/dicom"."""

from __future__ import annotations

import logging

import orjson
from aiohttp import BodyPartReader, web

from ricord_archive.errors import (
    ArchiveError,
    BadRequest,
    ObjectTooLarge,
    StorageUnavailable,
    UnsupportedMediaType,
)
from ricord_archive.web import app as web_app
from ricord_archive.web import audit, auth
from ricord_archive.web.media import DICOM, DICOM_JSON, parse_media_type

log = logging.getLogger(__name__)

_REFERENCED_SOP_SEQUENCE = "00081199"
_FAILED_SOP_SEQUENCE = "00081198"


def _uid(value: str | None) -> dict:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


async def _read_part(part: BodyPartReader, remaining: int) -> bytes:
    chunks, size = [], 0
    while chunk := await part.read_chunk(1024 * 1024):
        size += len(chunk)
        if size > remaining:
            raise ObjectTooLarge("the STOW-RS request exceeds the configured size limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def store(request: web.Request) -> web.Response:
    services = request.app[web_app.SERVICES]
    content_type = parse_media_type(request.headers.get("Content-Type", ""))
    if content_type.type != "multipart/related" or content_type.params.get("type") != DICOM:
        raise UnsupportedMediaType(
            'STOW-RS accepts multipart/related; type="application/dicom" only'
        )
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError) as exc:
        raise BadRequest("malformed multipart body") from exc
    base = web_app.base_url(request)
    target_study = request.match_info.get("study")
    stored, failed = [], []
    warned = False
    budget = services.max_stow_bytes
    site = auth.upload_site(request, services.default_site)
    try:
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise BadRequest("nested multipart bodies are not accepted")
            data = await _read_part(part, budget)
            budget -= len(data)
            if parse_media_type(part.headers.get("Content-Type", DICOM)).type != DICOM:
                failed.append({
                    "00081150": _uid(None),
                    "00081155": _uid(None),
                    "00081197": {"vr": "US", "Value": [0xC000]},
                })
                continue
            try:
                result = await audit.storing(
                    request, site, services.ingest.store(data, site, target_study)
                )
            except StorageUnavailable:
                raise  # the whole request: 503, send again later (re-sends are idempotent)
            except ArchiveError as exc:
                log.info("STOW-RS object refused: %s", exc.message)
                failed.append({
                    "00081150": _uid(exc.sop_class_uid),
                    "00081155": _uid(exc.sop_uid),
                    "00081197": {"vr": "US", "Value": [exc.failure_reason]},
                })
                continue
            url = f"{base}/studies/{result.study_uid}/series/{result.series_uid}" \
                  f"/instances/{result.sop_uid}"
            item = {
                "00081150": _uid(result.sop_class_uid),
                "00081155": _uid(result.sop_uid),
                "00081190": {"vr": "UR", "Value": [url]},
            }
            if result.warning:
                item["00081196"] = {"vr": "US", "Value": [result.warning]}  # WarningReason
                warned = True
            stored.append(item)
    except ValueError as exc:  # aiohttp's multipart parser on a broken body
        raise BadRequest("malformed multipart body") from exc
    if not stored and not failed:
        raise BadRequest("the multipart body holds no part")
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
