"""Incoming PDU lengths, checked on the 6-byte header before a byte of the PDU's body is read.

A peer announcing 4 GiB gets an A-ABORT and the connection is closed: the announced length is
never allocated and the peer's sends are never read (tests/dimse/test_dimse_hostile.py).
"""

from __future__ import annotations

from dataclasses import dataclass

HEADER_BYTES = 6  # PDU type, reserved, 32-bit big-endian length
P_DATA_TF = 0x04
PDU_TYPES = frozenset(range(0x01, 0x08))
# The PDU length of a P-DATA-TF PDU is at most the Maximum Length the archive announced (PS3.8
# 9.3.5); some peers count the PDV item headers on top of it.
P_DATA_ALLOWANCE = 64
# Association requests, acceptances and the fixed-size PDUs: generous for many presentation
# contexts and a user identity of 2 x 64 KiB, absurd beyond.
CONTROL_PDU_BYTES = 1024**2
# A-ABORT provider reasons (PS3.8 9.3.8)
UNRECOGNISED_PDU = 0x01
UNEXPECTED_PDU = 0x02
INVALID_PARAMETER_VALUE = 0x06


@dataclass(frozen=True)
class PduLimits:
    """The longest PDU accepted: P-DATA-TF by the announced maximum, others by a fixed cap."""

    max_pdu_bytes: int

    def refusal(self, pdu_type: int, length: int) -> int | None:
        """The A-ABORT reason for a PDU with this header, None when it is acceptable."""
        if pdu_type not in PDU_TYPES:
            return UNRECOGNISED_PDU
        limit = (
            self.max_pdu_bytes + P_DATA_ALLOWANCE if pdu_type == P_DATA_TF else CONTROL_PDU_BYTES
        )
        return INVALID_PARAMETER_VALUE if length > limit else None


def a_abort(reason: int) -> bytes:
    """An A-ABORT PDU from the service provider (source 2)."""
    return bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, reason])
