"""What the HTTP handlers share: the services of the application, the DICOMweb root and the
base URL a client reached it by, the DICOMweb routes marked with their service. Handlers
import this, never the application (`app`) that routes to them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
from aiohttp import web

from ricord_archive.audit_trail import NO_AUDIT, AuditTrail
from ricord_archive.services.clinical import ClinicalService
from ricord_archive.services.cohorts import CohortService
from ricord_archive.services.ingest import IngestService
from ricord_archive.services.labels import LabelService
from ricord_archive.services.query import QueryService
from ricord_archive.services.retrieve import RetrieveService
from ricord_archive.web import auth, forwarded

ROOT = "/dicom-web"


@dataclass
class Services:
    ingest: IngestService
    query: QueryService
    retrieve: RetrieveService
    default_site: str
    max_stow_bytes: int
    ready: Callable[[], bool]
    cors_origins: tuple[str, ...] = ("*",)
    authenticator: auth.Authenticator | None = None  # None: DICOMweb is open to anyone
    trusted_proxies: tuple[forwarded.Network, ...] = ()  # whose X-Forwarded-* count
    body_idle_timeout: float = 30.0  # seconds a STOW-RS body may stall
    send_timeout: float = 60.0  # seconds a response may wait for a client not reading
    audit: AuditTrail = NO_AUDIT
    cohorts: CohortService | None = None  # None: no /api/cohorts (tests of DICOMweb alone)
    clinical: ClinicalService | None = None  # None: no /api/clinical routes
    labels: LabelService | None = None  # None: no /api/annotations, /api/labels routes
    metrics: bool = True  # GET /metrics on this port
    ready_checks: Callable[[], Awaitable[dict[str, str]]] | None = None  # GET /ready


SERVICES = web.AppKey("services", Services)
# each DICOMweb route (GET and the HEAD beside it too) marked with its service: "stow", "qido"
# or "wado" (WADO-RS and WADO-URI: audited as retrievals); the metrics label requests with it
DICOMWEB_ROUTES = web.AppKey("dicomweb_routes", dict[web.AbstractRoute, str])


def base_url(request: web.Request) -> str:
    """The DICOMweb root as the client reached it (through a trusted proxy, if any)."""
    return f"{forwarded.origin(request, request.app[SERVICES].trusted_proxies)}{ROOT}"


def json_response(body: object, status: int) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def dicomweb_service(request: web.Request) -> str | None:
    """The DICOMweb service of the route the request matched; None outside DICOMweb."""
    return request.app.get(DICOMWEB_ROUTES, {}).get(request.match_info.route)


def is_retrieval(request: web.Request) -> bool:
    """Whether the request matched a WADO route."""
    return dicomweb_service(request) == "wado"
