"""The archive's DIMSE listeners on the event loop: the DIMSE port, and the DICOM TLS port when
`[tls]` is configured (its handshake in the connection's own task, within the network timeout,
so a peer that never finishes one holds nothing but its own connection)."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable

from ricord_archive.config import Config
from ricord_archive.dimse.pdu_guard import PduLimits
from ricord_archive.dimse.security import tls_context
from ricord_archive.dimse.transport import PduStream

log = logging.getLogger(__name__)

# A connection ready for PDUs: (stream, peer address, peer port).
Connected = Callable[[PduStream, str, int], Awaitable[None]]
_READ_BUFFER = 1024**2  # StreamReader pauses the socket beyond twice this


async def start_listeners(
    config: Config, connected: Connected, shared_port: bool = False
) -> list[asyncio.Server]:
    """Listen on the DIMSE port and the TLS port; with `shared_port` alongside the archive's
    other server processes (SO_REUSEPORT)."""
    context = tls_context(config.tls) if config.tls is not None else None  # fail before listening
    servers = [await _listen(config, config.dimse_port, connected, None, shared_port)]
    if config.tls is not None:
        try:
            servers.append(await _listen(config, config.tls.port, connected, context,
                                         shared_port))
        except BaseException:
            servers[0].close()
            raise
        log.info("DICOM TLS on %s:%d (client certificates %s)", config.dimse_host,
                 config.tls.port, "required" if config.tls.require_client_cert else "optional")
    return servers


async def _listen(
    config: Config, port: int, connected: Connected, tls: ssl.SSLContext | None,
    shared_port: bool,
) -> asyncio.Server:
    limits = PduLimits(config.limits.max_pdu_bytes)
    timeout = config.limits.network_timeout

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        address, peer_port = writer.get_extra_info("peername")[:2]
        peer = f"{address}:{peer_port}"
        sock = writer.get_extra_info("socket")
        if sock is not None:  # Nagle off: every response would wait for an ACK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            try:
                await writer.start_tls(tls, ssl_handshake_timeout=timeout)
            except (OSError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or type(exc).__name__
                log.warning("DICOM TLS handshake with %s failed: %s", peer, reason)
                writer.close()
                return
        await connected(PduStream(reader, writer, limits, peer, timeout), address, peer_port)

    return await asyncio.start_server(
        on_connection, config.dimse_host, port, reuse_port=shared_port or None,
        limit=_READ_BUFFER,
    )
