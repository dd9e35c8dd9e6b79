"""Who may do what on the /api routes (clinical data, cohorts): per-route rules, checked by the
handlers with this helper. DICOMweb keeps its rule by HTTP method (`auth.middleware`); for /api
the middleware only authenticates and leaves the decision to the route.

A handler calls `require(request, *roles)` first (403 for any other role), then:
- `upload_site(request)`: the site a write goes to: an uploader's own (a `?site=` naming
  another is refused), else `?site=` (admin, or anyone with authentication off), else the
  default site;
- `site_scope(request)`: the only site whose data the caller may read (an uploader's own),
  else `?site=` when given, else None: every site.

With authentication off there is no principal: everything is allowed, `?site=` names the site.
Site names are checked against the configured sites (400 for an unknown one).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiohttp import web

from ricord_archive.web.auth import PRINCIPAL, Principal

log = logging.getLogger(__name__)

SITE_PARAMETER = "site"


@dataclass(frozen=True)
class SiteNames:
    """The configured sites' names and the default site (set on the app by `create_app`)."""

    known: frozenset[str]
    default: str


SITES = web.AppKey("site_names", SiteNames)


def principal(request: web.Request) -> Principal | None:
    """The authenticated caller; None when authentication is off."""
    return request.get(PRINCIPAL)


def require(request: web.Request, *roles: str) -> Principal | None:
    """The caller, if its role is one of `roles` (403 otherwise); None with authentication
    off, where everything is allowed."""
    caller = principal(request)
    if caller is not None and caller.role not in roles:
        log.warning("refused %s %s to token %s: role %s may not", request.method,
                    request.path, caller.name, caller.role)
        raise web.HTTPForbidden(text=f"the {caller.role} role may not do this")
    return caller


def _named_site(request: web.Request) -> str | None:
    name = request.query.get(SITE_PARAMETER)
    if name is None:
        return None
    if name not in request.app[SITES].known:
        raise web.HTTPBadRequest(text="?site= names no configured site")
    return name


def _own_site(request: web.Request, caller: Principal, named: str | None) -> str:
    if caller.site_name is None:
        raise web.HTTPForbidden(text="this token is bound to no site")
    if named is not None and named != caller.site_name:
        log.warning("refused %s %s to token %s: another site than its own", request.method,
                    request.path, caller.name)
        raise web.HTTPForbidden(text="an uploader token acts for its own site only")
    return caller.site_name


def upload_site(request: web.Request) -> str:
    """The name of the site a write (an import) goes to."""
    caller = principal(request)
    named = _named_site(request)
    if caller is not None and caller.role == "uploader":
        return _own_site(request, caller, named)
    return named or request.app[SITES].default


def site_scope(request: web.Request) -> str | None:
    """The name of the site a read is limited to, or None for every site."""
    caller = principal(request)
    named = _named_site(request)
    if caller is not None and caller.role == "uploader":
        return _own_site(request, caller, named)
    return named
