"""The aiohttp application: routes, the one error mapping, and /health."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ricord_archive.errors import ArchiveError
from ricord_archive.search.model import Level
from ricord_archive.web import (
    access,
    auth,
    clinical,
    cohorts,
    http_audit,
    labels,
    ops,
    qido,
    stow,
    wado,
)
from ricord_archive.web.context import DICOMWEB_ROUTES, ROOT, SERVICES, Services, json_response

log = logging.getLogger(__name__)


@web.middleware
async def errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Map archive failures to HTTP in one place; never let an exception text leak PHI."""
    try:
        return await handler(request)
    except ArchiveError as exc:
        return json_response({"error": exc.message}, exc.http_status)
    except web.HTTPException:
        raise
    except Exception as exc:
        transport = request.transport
        if isinstance(exc, ConnectionError) and (transport is None or transport.is_closing()):
            log.info("%s %s: the client's connection was lost", request.method, request.path)
        else:
            log.error("internal error on %s %s: %s", request.method, request.path,
                      type(exc).__name__)
        return json_response({"error": "internal error"}, 500)


_CORS_METHODS = "GET, POST, OPTIONS"
_CORS_HEADERS = "Accept, Content-Type, Authorization, If-None-Match, Range"
_CORS_EXPOSED = "Warning, Link, Content-Type, Content-Length, ETag, Content-Location, X-Request-ID"


def _allowed_origin(request: web.Request) -> str | None:
    origin = request.headers.get("Origin")
    allowed = request.app[SERVICES].cors_origins
    if origin is None or not request.path.startswith(ROOT):
        return None
    if "*" in allowed:
        return "*"
    return origin if origin in allowed else None


@web.middleware
async def cors_preflight(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Answer CORS preflight requests on the DICOMweb routes."""
    if request.method != "OPTIONS" or not request.headers.get("Access-Control-Request-Method"):
        return await handler(request)
    origin = _allowed_origin(request)
    if origin is None:
        return web.Response(status=403, text="origin not allowed")
    return web.Response(status=204, headers={
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": _CORS_METHODS,
        "Access-Control-Allow-Headers": request.headers.get(
            "Access-Control-Request-Headers", _CORS_HEADERS
        ),
        "Access-Control-Max-Age": "600",
        "Vary": "Origin",
    })


async def _cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Before any response's headers go out (streamed ones too): allow the caller's origin."""
    origin = _allowed_origin(request)
    if origin is not None and "Access-Control-Allow-Origin" not in response.headers:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = _CORS_EXPOSED
        response.headers["Vary"] = "Origin"


async def health(request: web.Request) -> web.Response:
    ready = request.app[SERVICES].ready()
    return json_response({"status": "ready" if ready else "starting"}, 200 if ready else 503)


def add_dicomweb_routes(router: web.UrlDispatcher) -> dict[web.AbstractRoute, str]:
    """STOW-RS, QIDO-RS, WADO-RS and WADO-URI (also read by the conformance statement).
    Returns each route (the HEAD beside a GET too) with its service: "stow", "qido", "wado"."""
    study, series = f"{ROOT}/studies/{{study}}", f"{ROOT}/studies/{{study}}/series/{{series}}"
    instance = f"{series}/instances/{{instance}}"
    marked: dict[web.AbstractRoute, str] = {}

    def add(method: str, path: str, handler: Handler, service: str) -> None:
        added = (router.add_get if method == "GET" else router.add_post)(path, handler)
        marked.update({r: service for r in added.resource or () if r.handler is handler})

    add("POST", f"{ROOT}/studies", stow.store, "stow")
    add("POST", study, stow.store, "stow")
    for path, level in (
        (f"{ROOT}/studies", Level.STUDY),
        (f"{ROOT}/series", Level.SERIES),
        (f"{ROOT}/instances", Level.INSTANCE),
        (f"{study}/series", Level.SERIES),
        (f"{study}/instances", Level.INSTANCE),
        (f"{series}/instances", Level.INSTANCE),
    ):
        add("GET", path, qido.search(level), "qido")
    for resource in (study, series, instance):
        add("GET", resource, wado.retrieve, "wado")
        add("GET", f"{resource}/metadata", wado.metadata, "wado")
        add("GET", f"{resource}/thumbnail", wado.thumbnail, "wado")
    add("GET", f"{instance}/bulkdata/{{tag}}", wado.bulk_data, "wado")
    add("GET", f"{instance}/rendered", wado.rendered, "wado")
    add("GET", f"{instance}/frames/{{frames}}", wado.frames, "wado")
    add("GET", f"{instance}/frames/{{frames}}/rendered", wado.rendered, "wado")
    add("GET", "/wado", wado.wado_uri, "wado")
    return marked


def create_app(services: Services) -> web.Application:
    middlewares: list[Middleware] = [cors_preflight, errors]
    if services.authenticator is not None:  # after preflights, which carry no credentials
        middlewares.insert(1, auth.middleware(services.authenticator))
    middlewares.insert(1, http_audit.middleware)  # outside authentication: sees its 401 and 403
    middlewares.insert(0, ops.observe)  # outermost: every request has its id and is counted
    app = web.Application(middlewares=middlewares, client_max_size=1024**2)
    app[SERVICES] = services
    app[access.SITES] = access.SiteNames(frozenset(services.ingest.sites), services.default_site)
    if services.authenticator is not None:
        authenticator = services.authenticator

        async def close_authenticator(_: web.Application) -> None:
            await authenticator.close()

        app.on_cleanup.append(close_authenticator)
    app.on_response_prepare.append(_cors_headers)
    app.on_response_prepare.append(ops.request_id_header)
    app.router.add_get("/health", health)
    if services.ready_checks is not None:
        app.router.add_get("/ready", ops.ready_page(services.ready_checks))
    if services.metrics:
        app.router.add_get("/metrics", ops.metrics_page)
    app[DICOMWEB_ROUTES] = add_dicomweb_routes(app.router)
    if services.cohorts is not None:
        cohorts.add_routes(app)
    if services.clinical is not None:
        app.router.add_post("/api/clinical", clinical.import_sheet)
        app.router.add_post("/api/clinical/columns", clinical.declare_columns)
        app.router.add_get("/api/clinical", clinical.export_rows)
    if services.labels is not None:
        labels.add_routes(app)
    return app
