"""What the archive's pynetdicom associations need (those it requests: C-MOVE to a destination,
imports from a PACS)."""

from __future__ import annotations

import socket

from pynetdicom import evt


def no_delay(event: evt.Event) -> None:
    """Nagle off: pynetdicom never sets TCP_NODELAY, and every response would wait for an ACK.
    Bound to EVT_CONN_OPEN."""
    connection = event.assoc.dul.socket
    assert connection is not None and connection.socket is not None  # the connection is open
    connection.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
