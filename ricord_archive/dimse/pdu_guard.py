"""Incoming PDU lengths, checked before a byte of the PDU's body is read.

pynetdicom 3.0.4 reads a PDU's 6-byte header, then as many bytes as the header announces,
whatever the length (`DULServiceProvider._read_pdu_data`): a peer announcing 4 GiB is read
into memory until it stops sending. The archive's accepted sockets are therefore of the
classes below, which follow the PDU framing of the byte stream pynetdicom reads through
`recv()`: when a header is complete and announces more than the limit for its type (or an
unknown type), the peer gets an A-ABORT, the connection is shut down, and pynetdicom reads
end-of-stream, which ends the association (state machine event 17). The peer's sends are
never read; the announced length is never allocated.

This depends on nothing of pynetdicom but that it reads the peer through this socket's
`recv()`, and, for TLS, that it checks `pending()` on an `ssl.SSLSocket` (both covered by
tests/test_dimse_hostile.py and tests/test_dimse_tls.py).
"""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass

log = logging.getLogger(__name__)

HEADER_BYTES = 6  # PDU type, reserved, 32-bit big-endian length
P_DATA_TF = 0x04
PDU_TYPES = frozenset(range(0x01, 0x08))
# The PDU length of a P-DATA-TF PDU is at most the Maximum Length the archive announced (PS3.8
# 9.3.5); some peers count the PDV item headers on top of it.
P_DATA_ALLOWANCE = 64
# Association requests, acceptances and the fixed-size PDUs: generous for many presentation
# contexts and a user identity of 2 x 64 KiB, absurd beyond.
CONTROL_PDU_BYTES = 1024**2
_UNRECOGNISED_PDU = 0x01  # A-ABORT provider reasons (PS3.8 9.3.8)
_INVALID_PARAMETER_VALUE = 0x06


@dataclass(frozen=True)
class PduLimits:
    """The longest PDU accepted: P-DATA-TF by the announced maximum, others by a fixed cap."""

    max_pdu_bytes: int

    def refusal(self, pdu_type: int, length: int) -> int | None:
        """The A-ABORT reason for a PDU with this header, None when it is acceptable."""
        if pdu_type not in PDU_TYPES:
            return _UNRECOGNISED_PDU
        limit = (
            self.max_pdu_bytes + P_DATA_ALLOWANCE if pdu_type == P_DATA_TF else CONTROL_PDU_BYTES
        )
        return _INVALID_PARAMETER_VALUE if length > limit else None


def a_abort(reason: int) -> bytes:
    """An A-ABORT PDU from the service provider (source 2)."""
    return bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, reason])


class _PduFraming:
    """Follows the PDU framing of what `recv()` returns and refuses oversized headers.

    Reads never cross a PDU's end, so the next read starts at a header.
    """

    __slots__ = ()
    _limits: PduLimits | None
    _peer: str
    _header: bytes  # the current PDU's header bytes read so far
    _left: int  # bytes of the current PDU's body not read yet
    _refused: bool

    def limit_pdus(self, limits: PduLimits, peer: str) -> None:
        """Start checking; `peer` (host:port) names the connection in the log."""
        self._limits, self._peer = limits, peer
        self._header, self._left, self._refused = b"", 0, False

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if getattr(self, "_limits", None) is None or bufsize <= 0:
            return super().recv(bufsize, flags)  # type: ignore[misc]
        if self._refused:
            return b""
        if self._left:
            data: bytes = super().recv(min(bufsize, self._left), flags)  # type: ignore[misc]
            self._left -= len(data)
            return data
        wanted = min(bufsize, HEADER_BYTES - len(self._header))
        data = super().recv(wanted, flags)  # type: ignore[misc]
        self._header += data
        if len(self._header) < HEADER_BYTES:
            return data
        pdu_type, length = self._header[0], int.from_bytes(self._header[2:6], "big")
        self._header = b""
        reason = self._limits.refusal(pdu_type, length)  # type: ignore[union-attr]
        if reason is not None:
            self._refuse(pdu_type, length, reason)
            return b""
        self._left = length
        return data

    def _refuse(self, pdu_type: int, length: int, reason: int) -> None:
        """A-ABORT the peer and shut the connection down, without reading further."""
        self._refused = True
        log.warning(
            "DIMSE peer %s sent a PDU of type 0x%02X announcing %d bytes, beyond what the "
            "archive accepts: A-ABORT and close", self._peer, pdu_type, length,
        )
        sock: socket.socket = self  # type: ignore[assignment]
        try:
            sock.sendall(a_abort(reason))
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the peer is gone already


class GuardedSocket(_PduFraming, socket.socket):
    """A TCP connection whose incoming PDU lengths are checked."""

    __slots__ = ("_header", "_left", "_limits", "_peer", "_refused")

    @classmethod
    def adopt(cls, sock: socket.socket) -> GuardedSocket:
        """The same connection (its file descriptor and timeout) as a GuardedSocket."""
        timeout = sock.gettimeout()
        guarded = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        guarded.settimeout(timeout)
        return guarded


class GuardedSSLSocket(_PduFraming, ssl.SSLSocket):
    """A TLS connection whose incoming PDU lengths are checked; the `sslsocket_class` of the
    archive's TLS context."""
