"""The archive's DIMSE listeners: pynetdicom association servers whose connections have a
socket timeout, incoming PDU length checks and, on the TLS port, a handshake that runs in the
connection's own thread.

pynetdicom's server accepts sockets without a timeout (a peer stalling in the middle of a PDU
holds its thread forever) and performs the TLS handshake in the thread that accepts every
connection (a peer that never finishes its handshake stops the port). Here the accepting thread
only accepts.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

from ricord_archive.config import Config
from ricord_archive.dimse.pdu_guard import GuardedSocket, GuardedSSLSocket, PduLimits
from ricord_archive.dimse.security import tls_context

log = logging.getLogger(__name__)


class GuardedAssociationServer(ThreadedAssociationServer):
    """An association server whose connections are GuardedSockets (or GuardedSSLSockets)."""

    def __init__(
        self, *args: Any, pdu_limits: PduLimits, socket_timeout: float,
        tls: ssl.SSLContext | None = None, shared_port: bool = False, **kwargs: Any,
    ) -> None:
        self.pdu_limits = pdu_limits
        self.socket_timeout = socket_timeout
        self.tls = tls
        self.shared_port = shared_port
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        """With `shared_port`, the archive's other server processes listen on it too."""
        if self.shared_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept only: the TLS handshake happens in the connection's thread."""
        return self.socket.accept()

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Guard the connection (and secure it on the TLS port), then run the association."""
        peer = f"{client_address[0]}:{client_address[1]}"
        request.settimeout(self.socket_timeout)
        guarded: GuardedSocket | GuardedSSLSocket
        if self.tls is None:
            guarded = GuardedSocket.adopt(request)
        else:
            try:
                guarded = self.tls.wrap_socket(request, server_side=True)
            except (OSError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or type(exc).__name__
                log.warning("DICOM TLS handshake with %s failed: %s", peer, reason)
                self.shutdown_request(request)
                return
        guarded.limit_pdus(self.pdu_limits, peer)
        super().finish_request(guarded, client_address)


def serve(
    ae: AE, address: tuple[str, int], handlers: list[Any], pdu_limits: PduLimits,
    socket_timeout: float, tls: ssl.SSLContext | None = None, shared_port: bool = False,
) -> GuardedAssociationServer:
    """Start a listener in a daemon thread, as `AE.start_server(block=False)` does."""
    if tls is not None:
        tls.sslsocket_class = GuardedSSLSocket  # wrap_socket() then returns guarded sockets
    server = ae.make_server(
        address, evt_handlers=handlers, server_class=GuardedAssociationServer,
        pdu_limits=pdu_limits, socket_timeout=socket_timeout, tls=tls, shared_port=shared_port,
    )
    threading.Thread(
        target=server.serve_forever, name=f"DimseListener@{address[1]}", daemon=True
    ).start()
    # AE.shutdown() and server.shutdown() expect every server of the AE in this list
    ae._servers.append(server)
    return server


def start_listeners(
    ae: AE, config: Config, handlers: list[Any], shared_port: bool = False
) -> list[GuardedAssociationServer]:
    """The DIMSE port, and the DICOM TLS port when `[tls]` is configured; with `shared_port`
    both are shared with the archive's other server processes."""
    context = tls_context(config.tls) if config.tls is not None else None  # fail before listening
    limits = PduLimits(config.limits.max_pdu_bytes)
    timeout = config.limits.network_timeout
    servers = [serve(ae, (config.dimse_host, config.dimse_port), handlers, limits, timeout,
                     shared_port=shared_port)]
    if config.tls is not None:
        servers.append(serve(ae, (config.dimse_host, config.tls.port), handlers, limits,
                             timeout, context, shared_port))
        log.info("DICOM TLS on %s:%d (client certificates %s)", config.dimse_host,
                 config.tls.port, "required" if config.tls.require_client_cert else "optional")
    return servers
