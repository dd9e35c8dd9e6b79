"""The HTTP listener: plain or TLS, and per-connection deadlines aiohttp lacks. A client must
send a request's headers within `header_timeout` seconds of its first byte (or of connecting),
and a response may wait at most `send_timeout` seconds for a client that stopped reading.
(A stalled request body is STOW-RS's to time out: it is the only handler reading bodies.)"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from ricord_archive.config import ConfigError

log = logging.getLogger(__name__)

KEEPALIVE_TIMEOUT = 75.0  # seconds an idle keep-alive connection stays open (aiohttp's runner)


@dataclass(frozen=True)
class Deadlines:
    header_timeout: float
    send_timeout: float


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for the certificate chain and key: TLS 1.2 at least."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except OSError as exc:  # a missing file, or ssl.SSLError: not PEM, key and cert disagree
        raise ConfigError(f"cannot load tls_cert {cert} with tls_key {key}: {exc}") from exc
    return context


class GuardedHandler(RequestHandler):
    """aiohttp's connection handler with a header deadline and a send deadline."""

    def __init__(self, manager: web.Server, deadlines: Deadlines, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._deadlines = deadlines
        self._head_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._body: Any = None  # the payload of the last request whose headers arrived

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_head()

    def data_received(self, data: bytes) -> None:
        requests = self._request_count  # aiohttp counts requests whose headers it parsed
        in_body = self._body is not None and not self._body.is_eof()
        super().data_received(data)
        if self._request_count != requests:
            self._cancel_head()
            self._body = self._messages[-1][1] if self._messages else None
        elif data and not in_body and self._head_timer is None:
            self._arm_head()  # the first bytes of the next request on a kept-alive connection

    def pause_writing(self) -> None:
        super().pause_writing()
        self._send_timer = self._loop.call_later(self._deadlines.send_timeout, self._send_expired)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head()
        if self._send_timer is not None:
            self._send_timer.cancel()
        self._body = None
        super().connection_lost(exc)

    def _arm_head(self) -> None:
        self._head_timer = self._loop.call_later(self._deadlines.header_timeout,
                                                 self._head_expired)

    def _cancel_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        log.warning("closed an HTTP connection from %s: no complete request headers within "
                    "%g s", _peer(self), self._deadlines.header_timeout)
        self.force_close()

    def _send_expired(self) -> None:
        self._send_timer = None
        log.warning("closed an HTTP connection from %s: the client read nothing for %g s",
                    _peer(self), self._deadlines.send_timeout)
        if self.transport is not None:
            self.transport.abort()  # close() would wait for the unread buffer forever


def _peer(handler: RequestHandler) -> str:
    peer = handler.peername
    return str(peer[0]) if isinstance(peer, tuple) else "a client"


async def listen(runner: web.AppRunner, host: str, port: int, deadlines: Deadlines,
                 ssl_context: ssl.SSLContext | None = None,
                 shared_port: bool = False) -> asyncio.AbstractServer:
    """Serve the runner's application on host:port with guarded connections (with
    `shared_port`, alongside the archive's other server processes). Close the returned
    server before `runner.cleanup()`, which then ends the open connections."""
    server = runner.server
    assert server is not None, "runner.setup() first"
    loop = asyncio.get_running_loop()

    def handler() -> GuardedHandler:
        return GuardedHandler(server, deadlines, loop=loop, access_log=None,
                              keepalive_timeout=KEEPALIVE_TIMEOUT)

    return await loop.create_server(
        handler, host, port, ssl=ssl_context,
        ssl_handshake_timeout=deadlines.header_timeout if ssl_context else None,
        reuse_port=shared_port or None,
    )
