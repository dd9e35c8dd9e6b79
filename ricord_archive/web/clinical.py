"""`/api/clinical`: a site's clinical sheet in (POST, CSV or .xlsx; uploader for its own site,
admin for `?site=`), its column map (POST /api/clinical/columns, TOML), and the rows out (GET,
CSV or JSON by Accept; researcher and admin, an uploader its own site only)."""

from __future__ import annotations

from aiohttp import web

from ricord_archive.clinical import sheet
from ricord_archive.clinical.export import to_csv
from ricord_archive.errors import BadRequest, NotAcceptable, ObjectTooLarge, UnsupportedMediaType
from ricord_archive.services.clinical import ClinicalService
from ricord_archive.web import access, context
from ricord_archive.web.http_audit import actor

MAX_SHEET_BYTES = 64 * 1024**2
MAX_MAP_BYTES = 1024**2
_CSV_MEDIA = sheet.CSV
_JSON_MEDIA = "application/json"


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, refused (413) past `limit` bytes; read into memory only."""
    if request.content_length is not None and request.content_length > limit:
        raise ObjectTooLarge(f"the body exceeds {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            raise ObjectTooLarge(f"the body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _service(request: web.Request) -> ClinicalService:
    service = request.app[context.SERVICES].clinical
    assert service is not None  # the routes exist only with the service
    return service


@access.allow("uploader", "admin")
async def import_sheet(request: web.Request) -> web.Response:
    """POST /api/clinical: import a sheet; 200 with the summary (refused rows included)."""
    site = access.upload_site(request)
    media_type = request.content_type
    if media_type not in (sheet.CSV, sheet.XLSX):
        raise UnsupportedMediaType(f"a clinical sheet is {sheet.CSV} or {sheet.XLSX}")
    data = await read_body(request, MAX_SHEET_BYTES)
    summary = await _service(request).import_sheet(
        actor(request), "HTTP", site, data, media_type, request.query.get("sheet"),
    )
    return context.json_response({"site": site, **summary.as_dict()}, 200)


@access.allow("uploader", "admin")
async def declare_columns(request: web.Request) -> web.Response:
    """POST /api/clinical/columns: a column map (TOML) for the site."""
    site = access.upload_site(request)
    try:
        text = (await read_body(request, MAX_MAP_BYTES)).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the column map is not UTF-8 text") from None
    names = await _service(request).declare(site, text)
    return context.json_response({"site": site, "declared": names}, 200)


def _wants_csv(request: web.Request) -> bool:
    """CSV when Accept prefers it (names it before JSON, or text/*), else JSON."""
    accept = request.headers.get("Accept", "*/*")
    csv_at, json_at = accept.find(_CSV_MEDIA), accept.find(_JSON_MEDIA)
    if csv_at >= 0 and (json_at < 0 or csv_at < json_at):
        return True
    if json_at >= 0 or "*/*" in accept or "application/*" in accept:
        return False
    if "text/*" in accept:
        return True
    raise NotAcceptable(f"clinical rows are {_CSV_MEDIA} or {_JSON_MEDIA}")


@access.allow("uploader", "researcher", "admin")
async def export_rows(request: web.Request) -> web.Response:
    """GET /api/clinical: one row per examination, filtered by the query parameters."""
    site = access.site_scope(request)
    columns = request.query.get("columns", "archive")
    if columns not in ("archive", "ricord"):
        raise BadRequest("columns is archive or ricord")
    as_csv = _wants_csv(request)
    result = await _service(request).export(
        actor(request), "HTTP", site, request.query.items(), columns == "ricord",
    )
    if as_csv:
        return web.Response(text=to_csv(result.header, result.rows), content_type=_CSV_MEDIA)
    return context.json_response({"columns": result.header, "rows": result.rows}, 200)
