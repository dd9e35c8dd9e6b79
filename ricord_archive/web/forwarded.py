"""The origin (scheme://host[:port]) a client reached the archive by, for the absolute URLs the
archive hands out (RetrieveURL). `Forwarded` and `X-Forwarded-Proto`/`-Host` count only when
the connection comes straight from a configured trusted proxy: anyone else could name any host.
Proxies append to these headers, so the last value is the one the trusted proxy wrote."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from aiohttp import web

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_HOST = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?\Z")


def origin(request: web.Request, trusted_proxies: Iterable[Network]) -> str:
    """The client-facing origin of the request."""
    if _from(request, trusted_proxies):
        proto, host = _forwarded(request)
        if proto or host:
            return f"{proto or request.scheme}://{host or request.host}"
    url = request.url
    if url.explicit_port is None and request.transport is not None:
        # A Host header without a port (as dicomweb-client sends) gets the port the
        # connection actually arrived on.
        local = request.transport.get_extra_info("sockname")
        default = 443 if url.scheme == "https" else 80
        if local and local[1] != default:
            url = url.with_port(local[1])
    return str(url.origin())


def _from(request: web.Request, networks: Iterable[Network]) -> bool:
    """Whether the immediate peer's address is in one of `networks`."""
    try:
        peer = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return False
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
        peer = peer.ipv4_mapped
    return any(peer in network for network in networks)


def _forwarded(request: web.Request) -> tuple[str | None, str | None]:
    """The last proto and host the proxies forwarded, each None when absent or malformed."""
    element = request.forwarded[-1] if request.forwarded else {}
    proto = element.get("proto") or _last(request.headers.get("X-Forwarded-Proto"))
    host = element.get("host") or _last(request.headers.get("X-Forwarded-Host"))
    proto = proto.lower() if proto and proto.lower() in ("http", "https") else None
    return proto, host if host and _HOST.match(host) else None


def _last(header: str | None) -> str | None:
    return header.rsplit(",", 1)[-1].strip() if header else None
