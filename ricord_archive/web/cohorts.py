"""/api/cohorts: create (freeze), list, show, delete, and the downloads (NBIA manifest,
metadata.csv, the file list with sizes and SHA-256, the whole cohort as one ZIP)."""

from __future__ import annotations

import re
from typing import Any

import orjson
from aiohttp import web

from ricord_archive import audit_trail
from ricord_archive.errors import BadRequest
from ricord_archive.services.cohort_export import parse_spec
from ricord_archive.services.cohorts import Cohort, CohortService
from ricord_archive.web import access, context, forwarded, http_audit
from ricord_archive.web.zip_stream import Tally, send_zip

ROOT = "/api/cohorts"
_READERS = ("uploader", "researcher", "admin")


def _service(request: web.Request) -> CohortService:
    service = request.app[context.SERVICES].cohorts
    assert service is not None  # the routes exist only with the service
    return service


def _site_id(request: web.Request) -> int | None:
    """The only site whose series and cohorts the caller may see (an uploader's, or `?site=`),
    as its index id; None for every site."""
    name = access.site_scope(request)
    return request.app[context.SERVICES].ingest.sites[name].id if name else None


def _origin(request: web.Request) -> str:
    return forwarded.origin(request, request.app[context.SERVICES].trusted_proxies)


def _describe(request: web.Request, cohort: Cohort) -> dict[str, Any]:
    base = f"{_origin(request)}{ROOT}/{cohort.id}"
    sites = {s.id: s.name for s in request.app[context.SERVICES].ingest.sites.values()}
    return {
        "id": cohort.id, "name": cohort.name, "description": cohort.description,
        "license": cohort.license, "citation": cohort.citation, "filters": cohort.filters,
        "site": sites.get(cohort.site_id) if cohort.site_id is not None else None,
        "created": cohort.created_at.isoformat(),
        "counts": {"studies": cohort.num_studies, "series": cohort.num_series,
                   "instances": cohort.num_instances},
        "bytes": cohort.size_bytes,
        "links": {name: f"{base}/{name}"
                  for name in ("manifest.tcia", "metadata.csv", "files", "archive.zip")},
    }


def _json(body: object, status: int = 200, headers: dict[str, str] | None = None
          ) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status,
                        content_type="application/json", headers=headers)


async def _cohort(request: web.Request) -> Cohort:
    """The cohort the path names, if the caller may see it (404 otherwise)."""
    text = request.match_info["id"]
    if not re.fullmatch(r"[0-9]{1,18}", text):
        raise BadRequest("a cohort id is a number")
    return await _service(request).get(int(text), _site_id(request))


@access.allow(*_READERS)
async def create(request: web.Request) -> web.Response:
    """Freeze the series matching the filters: 201 with the cohort's id, counts and bytes."""
    caller = access.principal(request)
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise BadRequest("the body is not JSON") from exc
    cohort = await _service(request).create(
        parse_spec(body), _site_id(request), caller.name if caller else None)
    described = _describe(request, cohort)
    return _json(described, 201, {"Location": f"{_origin(request)}{ROOT}/{cohort.id}"})


@access.allow(*_READERS)
async def listing(request: web.Request) -> web.Response:
    cohorts = await _service(request).list(_site_id(request))
    return _json([_describe(request, c) for c in cohorts])


@access.allow(*_READERS)
async def show(request: web.Request) -> web.Response:
    return _json(_describe(request, await _cohort(request)))


@access.allow("admin")
async def delete(request: web.Request) -> web.Response:
    cohort = await _cohort(request)
    await _service(request).delete(cohort.id)
    return web.Response(status=204)


def _record(request: web.Request, cohort: Cohort, sent: int, status: int) -> None:
    outcome = audit_trail.Outcome.SUCCESS if status < 400 else audit_trail.Outcome.MINOR_FAILURE
    request.app[context.SERVICES].audit.record(audit_trail.cohort_downloaded(
        http_audit.actor(request), http_audit.route(request), cohort.id, cohort.num_studies,
        sent, outcome, status,
    ))


async def _download(request: web.Request, cohort: Cohort, body: bytes, content_type: str,
                    filename: str) -> web.Response:
    _record(request, cohort, len(body), 200)
    return web.Response(body=body, content_type=content_type, charset="utf-8", headers={
        "Content-Disposition": f'attachment; filename="{filename}"'})


@access.allow(*_READERS)
async def manifest(request: web.Request) -> web.Response:
    """The NBIA Data Retriever manifest: its download URL is the cohort's ZIP."""
    cohort = await _cohort(request)
    url = f"{_origin(request)}{ROOT}/{cohort.id}/archive.zip"
    body = await _service(request).manifest(cohort, url)
    return await _download(request, cohort, body, "text/plain", f"{cohort.name}.tcia")


@access.allow(*_READERS)
async def metadata(request: web.Request) -> web.Response:
    cohort = await _cohort(request)
    body = await _service(request).metadata_csv(cohort)
    return await _download(request, cohort, body, "text/csv", "metadata.csv")


@access.allow(*_READERS)
async def files(request: web.Request) -> web.Response:
    """Every file of the cohort's ZIP with its size and SHA-256, and the ZIP's size and ETag."""
    cohort = await _cohort(request)
    archive, listed = await _service(request).file_list(cohort)
    return _json({"archive": {"size": archive.layout.size, "etag": archive.etag},
                  "files": listed})


@access.allow(*_READERS)
async def archive_zip(request: web.Request) -> web.StreamResponse:
    """The whole cohort as one ZIP; one byte range honoured (206), so downloads resume."""
    cohort = await _cohort(request)
    archive = await _service(request).archive(cohort)
    tally, status = Tally(), 500
    try:
        response = await send_zip(request, archive.layout, archive.sources,
                                  f"{cohort.name}.zip", archive.etag, tally)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        _record(request, cohort, tally.sent, status)


def add_routes(app: web.Application) -> None:
    app.router.add_post(ROOT, create)
    app.router.add_get(ROOT, listing)
    item = f"{ROOT}/{{id}}"
    app.router.add_get(item, show)
    app.router.add_delete(item, delete)
    app.router.add_get(f"{item}/manifest.tcia", manifest)
    app.router.add_get(f"{item}/metadata.csv", metadata)
    app.router.add_get(f"{item}/files", files)
    app.router.add_get(f"{item}/archive.zip", archive_zip)
