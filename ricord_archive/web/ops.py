"""Operating the HTTP side: a request id for every request (its log lines and `X-Request-ID`),
DICOMweb request metrics by route template, `GET /metrics` and `GET /ready`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from ricord_archive.runtime import logs, metrics
from ricord_archive.runtime.readiness import OK
from ricord_archive.web import context

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID = web.RequestKey("request_id", str)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
_DICOMWEB = ("/dicom-web", "/wado")


def _labels(request: web.Request) -> tuple[str, str] | None:
    """(service, route template) of a DICOMweb request; None for anything else (/health,
    /metrics, /ready). The route is the template (`/dicom-web/studies/{study}`), never the
    path as sent, so no UID becomes a label value."""
    if not request.path.startswith(_DICOMWEB):
        return None
    resource = request.match_info.route.resource
    if resource is None:
        return "unmatched", "unmatched"
    return context.dicomweb_service(request) or "other", resource.canonical


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The outermost middleware: a fresh request id in force for the request's log lines, and
    its count and latency once the response is sent (streamed ones included)."""
    request[REQUEST_ID] = logs.new_id()
    token = logs.request_id.set(request[REQUEST_ID])
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        labels = _labels(request)
        if labels is not None:
            method = request.method if request.method in _METHODS else "other"
            metrics.HTTP_REQUESTS.labels(*labels, method, str(status)).inc()
            metrics.HTTP_SECONDS.labels(*labels, str(status)).observe(
                time.perf_counter() - started
            )
        logs.request_id.reset(token)


async def request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """Before any response's headers go out: `X-Request-ID`, as in the log lines."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers["X-Request-ID"] = request_id


async def metrics_page(_: web.Request) -> web.Response:
    """Every server process's metrics, in the Prometheus text format."""
    body = await asyncio.to_thread(metrics.exposition)
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})


def ready_page(checks: Callable[[], Awaitable[dict[str, str]]]) -> Handler:
    """`GET /ready`: 200 when every check passes, else 503; the body names each check's
    result and lists the failing ones under `not_ready`."""

    async def ready(_: web.Request) -> web.Response:
        results = await checks()
        failing = sorted(name for name, result in results.items() if result != OK)
        body = {"status": "not ready" if failing else "ready", "not_ready": failing,
                "checks": results}
        return web.Response(body=orjson.dumps(body), status=503 if failing else 200,
                            content_type="application/json")

    return ready


def metrics_app() -> web.Application:
    """The application of the metrics port of its own (`[metrics] port`)."""
    app = web.Application()
    app.router.add_get("/metrics", metrics_page)
    return app
