"""DICOMweb authentication by bearer tokens (static tokens known by their hash, and OpenID
Connect JWTs through a TokenVerifier), and the one place a request becomes a principal: who
calls (a configured token's name), in which role, bound to which site."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web
from aiohttp.typedefs import Middleware

from ricord_archive.config import ApiToken

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})  # operations: no PHI
API_PREFIX = "/api/"  # authenticated here, authorized per route (web/access.py)
API_ROLES = "api_roles"  # the attribute `access.allow` sets on an /api handler
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="ricord-archive"'}
_METHODS = {  # what each role may do: GET reads (QIDO, WADO), POST stores (STOW)
    "uploader": frozenset({"GET", "HEAD", "POST"}),
    "researcher": frozenset({"GET", "HEAD"}),
    "annotator": frozenset({"GET", "HEAD"}),  # views images; imports labels on /api
    "admin": frozenset({"GET", "HEAD", "POST"}),
}


@dataclass(frozen=True)
class Principal:
    """The caller of a request. An uploader has a site: it stores there and reads only there."""

    name: str
    role: str
    site_name: str | None = None
    site_id: int | None = None  # the site's id in the index


PRINCIPAL = web.RequestKey("principal", Principal)


class Unauthenticated(Exception):
    """No valid credentials: 401. The message names the kind of failure, never the token."""


class Forbidden(Exception):
    """Valid credentials that grant nothing here: 403."""


class TokenVerifier(Protocol):
    async def principal(self, token: str) -> Principal:
        """The token's principal, else Unauthenticated or Forbidden."""

    async def close(self) -> None: ...


class Authenticator:
    """Bearer tokens known by their SHA-256, compared in constant time against every one; a
    token none matches goes to the verifier (OpenID Connect) when there is one and it looks
    like a JWT."""

    def __init__(self, tokens: Iterable[ApiToken], site_ids: Mapping[str, int],
                 verifier: TokenVerifier | None = None) -> None:
        self._known = [
            (bytes.fromhex(t.sha256),
             Principal(t.name, t.role, t.site, site_ids[t.site] if t.site else None))
            for t in tokens
        ]
        self._verifier = verifier

    async def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an `Authorization` header, else Unauthenticated or Forbidden."""
        principal = self.principal(authorization)
        if principal is not None:
            return principal
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if self._verifier is not None and scheme.lower() == "bearer" and token.count(".") == 2:
            return await self._verifier.principal(token)
        raise Unauthenticated("no known bearer token")

    async def close(self) -> None:
        if self._verifier is not None:
            await self._verifier.close()

    def principal(self, authorization: str | None) -> Principal | None:
        """The principal of an `Authorization: Bearer <token>` header; None when unknown."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for known, principal in self._known:  # no early exit: time does not tell which matched
            if hmac.compare_digest(digest, known):
                found = principal
        return found


def middleware(authenticator: Authenticator) -> Middleware:
    """401 without a known token, 403 when the role may not use the method (DICOMweb; the /api
    routes decide per route with `web.access`); else the request goes on with its principal
    stored on it."""

    @web.middleware
    async def authenticate(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        try:
            principal = await authenticator.authenticate(request.headers.get("Authorization"))
        except Unauthenticated as exc:
            log.warning("refused %s %s: %s", request.method, request.path, exc)
            raise web.HTTPUnauthorized(
                headers=_CHALLENGE, text="a known bearer token is needed"
            ) from None
        except Forbidden as exc:
            log.warning("refused %s %s: %s", request.method, request.path, exc)
            raise web.HTTPForbidden(text=str(exc)) from None
        if request.path.startswith(API_PREFIX):
            if request.match_info.http_exception is None and not hasattr(
                request.match_info.handler, API_ROLES
            ):
                log.error("refused %s %s: the route declares no access rule", request.method,
                          request.path)
                raise web.HTTPForbidden(text="this route declares no access rule")
        elif request.method not in _METHODS[principal.role]:
            log.warning("refused %s %s to token %s: role %s may not", request.method,
                        request.path, principal.name, principal.role)
            raise web.HTTPForbidden(text=f"the {principal.role} role may not do this")
        request[PRINCIPAL] = principal
        return await handler(request)

    return authenticate


def site_id(request: web.Request) -> int | None:
    """The only site whose data the caller may read, or None for all sites."""
    principal = request.get(PRINCIPAL)
    return principal.site_id if principal is not None else None


def upload_site(request: web.Request, default: str) -> str:
    """The site a STOW-RS upload goes to: the uploader's own, else the default site."""
    principal = request.get(PRINCIPAL)
    return principal.site_name if principal is not None and principal.site_name else default
