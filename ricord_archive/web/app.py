"""The aiohttp application: routes, the one error mapping, and /health."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
from aiohttp import web

from ricord_archive.errors import ArchiveError
from ricord_archive.ingest import IngestService
from ricord_archive.query import QueryService
from ricord_archive.retrieve import RetrieveService
from ricord_archive.web import qido, stow, wado

log = logging.getLogger(__name__)

ROOT = "/dicom-web"


@dataclass
class Services:
    ingest: IngestService
    query: QueryService
    retrieve: RetrieveService
    default_site: str
    max_stow_bytes: int
    ready: Callable[[], bool]


SERVICES = web.AppKey("services", Services)


def base_url(request: web.Request) -> str:
    """The DICOMweb root as the client reached it. A Host header without a port (as
    dicomweb-client sends) gets the port the connection actually arrived on."""
    url = request.url
    if url.explicit_port is None and request.transport is not None:
        local = request.transport.get_extra_info("sockname")
        default = 443 if url.scheme == "https" else 80
        if local and local[1] != default:
            url = url.with_port(local[1])
    return f"{url.origin()}{ROOT}"


def json_response(body: object, status: int) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


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
        log.error("internal error on %s %s: %s", request.method, request.path, type(exc).__name__)
        return json_response({"error": "internal error"}, 500)


async def health(request: web.Request) -> web.Response:
    ready = request.app[SERVICES].ready()
    return json_response({"status": "ready" if ready else "starting"}, 200 if ready else 503)


def create_app(services: Services) -> web.Application:
    app = web.Application(middlewares=[errors], client_max_size=1024**2)
    app[SERVICES] = services
    app.router.add_get("/health", health)
    app.router.add_post(f"{ROOT}/studies", stow.store)
    app.router.add_post(f"{ROOT}/studies/{{study}}", stow.store)
    app.router.add_get(f"{ROOT}/studies", qido.search_studies)
    app.router.add_get(f"{ROOT}/studies/{{study}}", wado.retrieve)
    app.router.add_get(f"{ROOT}/studies/{{study}}/metadata", wado.metadata)
    app.router.add_get(f"{ROOT}/studies/{{study}}/series/{{series}}", wado.retrieve)
    app.router.add_get(f"{ROOT}/studies/{{study}}/series/{{series}}/metadata", wado.metadata)
    instance = f"{ROOT}/studies/{{study}}/series/{{series}}/instances/{{instance}}"
    app.router.add_get(instance, wado.retrieve)
    app.router.add_get(f"{instance}/metadata", wado.metadata)
    app.router.add_get(f"{instance}/bulkdata/{{tag}}", wado.bulk_data)
    return app
