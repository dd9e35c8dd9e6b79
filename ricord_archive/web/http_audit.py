"""The HTTP side of the audit trail: who a request comes from, refused accesses (401, 403),
WADO retrievals (one event per request), and the helper QIDO-RS wraps its searches in (STOW-RS
names the actor; ingest records the stored objects). Paths are recorded by route template,
never as sent."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from ricord_archive import audit_trail
from ricord_archive.search.model import Level
from ricord_archive.web import context
from ricord_archive.web.auth import PRINCIPAL

P = TypeVar("P", bound=audit_trail.SearchPage)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
_WADO_URI_UIDS = ("studyUID", "seriesUID", "objectUID")
_SCOPE_KEYWORDS = {"study": "StudyInstanceUID", "series": "SeriesInstanceUID"}


def actor(request: web.Request) -> audit_trail.Actor:
    """The caller: its token's name, role and site; 'anonymous' when authentication is off or
    no known token came."""
    principal = request.get(PRINCIPAL)
    authenticator = request.app[context.SERVICES].authenticator
    if principal is None and authenticator is not None:  # refused before it was stored
        principal = authenticator.principal(request.headers.get("Authorization"))
    if principal is None:
        return audit_trail.Actor(None, "anonymous", None, request.remote)
    return audit_trail.Actor(principal.name, principal.role, principal.site_name, request.remote)


def route(request: web.Request) -> str | None:
    """The path template the request matched (no UIDs as sent), None when it matched none."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else None


def _trail(request: web.Request) -> audit_trail.AuditTrail:
    return request.app[context.SERVICES].audit


async def searching(request: web.Request, level: Level, search: Awaitable[P]) -> P:
    """A QIDO-RS search, recorded with the keywords of its parameters and path."""
    params = [*request.query.items(),
              *((_SCOPE_KEYWORDS[k], "scope") for k in request.match_info)]
    return await audit_trail.querying(_trail(request), actor(request), "QIDO-RS", level, params,
                                      search)


def _retrieved_uids(request: web.Request) -> tuple[str, ...]:
    if "study" in request.match_info:
        return tuple(request.match_info[k] for k in ("study", "series", "instance")
                     if k in request.match_info)
    return tuple(request.query.get(k, "") for k in _WADO_URI_UIDS)


def _record(request: web.Request, status: int) -> None:
    """The audit event of a finished request with this status, if it has one."""
    if status in (401, 403):
        method = request.method if request.method in _METHODS else "other"
        _trail(request).record(
            audit_trail.access_refused(actor(request), status, route(request), method)
        )
    elif context.is_retrieval(request):
        success = status < 400
        outcome = (audit_trail.Outcome.SUCCESS if success else audit_trail.Outcome.SERIOUS_FAILURE
                   if status >= 500 else audit_trail.Outcome.MINOR_FAILURE)
        # a successful retrieval found these UIDs in the index: de-identified ones
        uids = _retrieved_uids(request) if success else ()
        protocol = "WADO-URI" if "study" not in request.match_info else "WADO-RS"
        _trail(request).record(audit_trail.retrieved(
            actor(request), protocol, route(request), uids, outcome, {"status": status}
        ))


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Record refused accesses and WADO retrievals, whatever ends the request: a response,
    an HTTP exception (the authentication middleware's 401 and 403), or a failure."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        _record(request, exc.status)
        raise
    except Exception:
        _record(request, 500)
        raise
    _record(request, response.status)
    return response
