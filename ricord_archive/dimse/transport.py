"""PDUs on an asyncio stream: read by their 6-byte header (checked before the body is read),
written whole; P-DATA-TF bodies split into presentation data values and built from them."""

from __future__ import annotations

import asyncio
import logging
import struct

from ricord_archive.dimse.pdu_guard import HEADER_BYTES, PduLimits, a_abort

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">BxL")
_PDV_HEADER = struct.Struct(">LB")
REASON_NOT_SPECIFIED = 0x00


class PeerGone(Exception):
    """The peer closed the connection, stalled beyond the timeout, or sent what cannot be read;
    the connection is closed (after an A-ABORT where one is due)."""


class PeerIdle(Exception):
    """No PDU began within the idle timeout; nothing was read."""


class PduStream:
    """One DIMSE connection: PDUs in (length-checked), PDUs out."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limits: PduLimits,
        peer: str, network_timeout: float,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.limits = limits
        self.peer = peer
        self.network_timeout = network_timeout

    async def read(self, idle_timeout: float, retry_on_idle: bool = False) -> tuple[int, bytes]:
        """The next PDU (type, body). The header may take `idle_timeout` to come (beyond it:
        TimeoutError with `retry_on_idle`, nothing read; else A-ABORT), the body the network
        timeout. Raises PeerGone; a refused header is answered with an A-ABORT."""
        try:
            try:
                async with asyncio.timeout(idle_timeout):
                    header = await self.reader.readexactly(HEADER_BYTES)
            except TimeoutError:
                if retry_on_idle:
                    raise PeerIdle from None
                raise
            pdu_type, length = _HEADER.unpack(header)
            reason = self.limits.refusal(pdu_type, length)
            if reason is not None:
                log.warning(
                    "DIMSE peer %s sent a PDU of type 0x%02X announcing %d bytes, beyond what "
                    "the archive accepts: A-ABORT and close", self.peer, pdu_type, length,
                )
                await self.abort(reason)
                raise PeerGone("PDU refused")
            async with asyncio.timeout(self.network_timeout):
                body = await self.reader.readexactly(length)
        except TimeoutError:
            log.info("DIMSE peer %s stalled beyond the timeout: A-ABORT and close", self.peer)
            await self.abort(REASON_NOT_SPECIFIED)
            raise PeerGone("timeout") from None
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            self.writer.close()
            raise PeerGone(type(exc).__name__) from None
        return pdu_type, body

    def write(self, data: bytes) -> None:
        """Queue bytes (whole PDUs) for the peer."""
        self.writer.write(data)

    async def drain(self) -> None:
        """Wait until the peer has taken what was written (PeerGone when it does not in time)."""
        try:
            async with asyncio.timeout(self.network_timeout):
                await self.writer.drain()
        except (TimeoutError, ConnectionError, OSError) as exc:
            self.writer.close()
            raise PeerGone(type(exc).__name__) from None

    async def abort(self, reason: int) -> None:
        """A-ABORT (from the service provider) and close."""
        if not self.writer.is_closing():
            self.writer.write(a_abort(reason))
        await self.close()

    async def close(self) -> None:
        """Send what is queued (within the network timeout) and close."""
        if self.writer.is_closing():
            return
        try:
            async with asyncio.timeout(self.network_timeout):
                await self.writer.drain()
        except (TimeoutError, ConnectionError, OSError):
            pass
        self.writer.close()


def pdvs(body: bytes) -> list[tuple[int, memoryview]] | None:
    """The presentation data values of a P-DATA-TF body, (context ID, control header + data),
    views of the body; None when the items do not add up to the body."""
    values = []
    view = memoryview(body)
    offset = 0
    while offset < len(body):
        if offset + 6 > len(body):
            return None
        length, context_id = _PDV_HEADER.unpack_from(body, offset)
        end = offset + 4 + length
        if length < 2 or end > len(body):
            return None
        values.append((context_id, view[offset + 5:end]))
        offset = end
    return values or None


def p_data_tf(context_id: int, value: bytes) -> bytes:
    """A P-DATA-TF PDU of one presentation data value (control header + data)."""
    return b"".join((
        _HEADER.pack(0x04, len(value) + 5), _PDV_HEADER.pack(len(value) + 1, context_id), value,
    ))
