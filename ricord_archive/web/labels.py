"""`/api/annotations` and `/api/labels`: an MD.ai export in (POST; admin or annotator), the
annotations out as JSON or as MD.ai's export shape, the labels, and the readers' consensus
(researcher, annotator, admin)."""

from __future__ import annotations

from dataclasses import asdict

import orjson
from aiohttp import web

from ricord_archive.errors import BadRequest, UnsupportedMediaType
from ricord_archive.index.labels import AnnotationFilter
from ricord_archive.labels.mdai import annotation_entry, label_entry
from ricord_archive.services.labels import LabelService
from ricord_archive.web import access, context
from ricord_archive.web.clinical import read_body
from ricord_archive.web.http_audit import actor

MAX_EXPORT_BYTES = 512 * 1024**2
_READERS = ("researcher", "annotator", "admin")
_FILTERS = {"StudyInstanceUID": "study_uid", "SeriesInstanceUID": "series_uid",
            "label": "label", "group": "group", "reader": "reader"}


def _service(request: web.Request) -> LabelService:
    service = request.app[context.SERVICES].labels
    assert service is not None  # the routes exist only with the service
    return service


def _filter(request: web.Request, allowed: frozenset[str] = frozenset()) -> AnnotationFilter:
    unknown = set(request.query) - set(_FILTERS) - allowed
    if unknown:
        raise BadRequest(f"unknown parameters: {', '.join(sorted(k[:32] for k in unknown))}; "
                         f"filters are {', '.join(_FILTERS)}")
    return AnnotationFilter(**{name: request.query[key] for key, name in _FILTERS.items()
                               if key in request.query})


@access.allow("annotator", "admin")
async def import_export(request: web.Request) -> web.Response:
    """POST /api/annotations: an MD.ai export (JSON); `?keep_notes=true` keeps the notes."""
    if request.content_type != "application/json":
        raise UnsupportedMediaType("an MD.ai export is application/json")
    keep = request.query.get("keep_notes", "false")
    if keep not in ("true", "false"):
        raise BadRequest("keep_notes is true or false")
    data = await read_body(request, MAX_EXPORT_BYTES)
    summary = await _service(request).import_export(actor(request), "HTTP", data,
                                                    keep == "true")
    return context.json_response(summary.as_dict(), 200)


@access.allow(*_READERS)
async def listing(request: web.Request) -> web.Response:
    """GET /api/annotations: the annotations matching the filters, with their label's name."""
    service = _service(request)
    found = await service.annotations(**asdict(_filter(request)))
    labels = {label.id: label for label in await service.labels()}
    return context.json_response([
        {**annotation_entry(a), "label": labels[a.label_id].name,
         "group": labels[a.label_id].group_id, "reader": a.reader} for a in found
    ], 200)


@access.allow(*_READERS)
async def export(request: web.Request) -> web.Response:
    """GET /api/annotations/export?format=mdai: MD.ai's export shape."""
    if request.query.get("format", "mdai") != "mdai":
        raise BadRequest("format is mdai")
    document = await _service(request).export(actor(request), "HTTP",
                                              _filter(request, frozenset({"format"})))
    return web.Response(body=orjson.dumps(document), content_type="application/json",
                        headers={"Content-Disposition": 'attachment; filename="annotations'
                                                        '.json"'})


@access.allow(*_READERS)
async def labels(request: web.Request) -> web.Response:
    """GET /api/labels: every label group with its labels and their codes."""
    service = _service(request)
    stored = await service.labels()
    return context.json_response([
        {"id": g.id, "name": g.name,
         "labels": [label_entry(lb) for lb in stored if lb.group_id == g.id]}
        for g in await service.groups()
    ], 200)


@access.allow(*_READERS)
async def consensus(request: web.Request) -> web.Response:
    """GET /api/labels/consensus[?label_group=]: per examination, each reader's global labels,
    the majority and whether the readers agreed."""
    unknown = set(request.query) - {"label_group"}
    if unknown:
        raise BadRequest("the only parameter is label_group")
    items = await _service(request).consensus(request.query.get("label_group"))
    return context.json_response(items, 200)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/annotations", import_export)
    app.router.add_get("/api/annotations", listing)
    app.router.add_get("/api/annotations/export", export)
    app.router.add_get("/api/labels", labels)
    app.router.add_get("/api/labels/consensus", consensus)
