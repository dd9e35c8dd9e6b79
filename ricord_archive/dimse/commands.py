"""DIMSE messages: command sets (PS3.7 E.1, always Implicit VR Little Endian, group 0000) encoded
and decoded here, and messages cut into presentation data values and assembled from them
(PS3.8 E.2).

pynetdicom's DIMSEMessage does the same through a pydicom Dataset: about 200 μs per message
(bench/dimse_floor.py), most of a C-STORE's protocol cost. The command group has twenty
elements of five VRs; they are encoded directly.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

# keyword: (element of group 0000, VR); in element order
_FIELDS: dict[str, tuple[int, str]] = {
    "AffectedSOPClassUID": (0x0002, "UI"),
    "CommandField": (0x0100, "US"),
    "MessageID": (0x0110, "US"),
    "MessageIDBeingRespondedTo": (0x0120, "US"),
    "MoveDestination": (0x0600, "AE"),
    "Priority": (0x0700, "US"),
    "CommandDataSetType": (0x0800, "US"),
    "Status": (0x0900, "US"),
    "ErrorComment": (0x0902, "LO"),
    "ErrorID": (0x0903, "US"),
    "AffectedSOPInstanceUID": (0x1000, "UI"),
    "NumberOfRemainingSuboperations": (0x1020, "US"),
    "NumberOfCompletedSuboperations": (0x1021, "US"),
    "NumberOfFailedSuboperations": (0x1022, "US"),
    "NumberOfWarningSuboperations": (0x1023, "US"),
    "MoveOriginatorApplicationEntityTitle": (0x1030, "AE"),
    "MoveOriginatorMessageID": (0x1031, "US"),
}
_BY_ELEMENT = {element: (keyword, vr) for keyword, (element, vr) in _FIELDS.items()}
_ELEMENT = struct.Struct("<HHL")
_NO_DATA_SET = 0x0101

C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_GET_RQ, C_GET_RSP = 0x0010, 0x8010
C_FIND_RQ, C_FIND_RSP = 0x0020, 0x8020
C_MOVE_RQ, C_MOVE_RSP = 0x0021, 0x8021
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
C_CANCEL_RQ = 0x0FFF


@dataclass
class Message:
    """A DIMSE message: its command set (keyword: value) and its encoded data set, if any."""

    context_id: int
    command: dict[str, Any]
    dataset: bytes | None = None


def encode_command(command: Mapping[str, Any], has_dataset: bool) -> bytes:
    """The command set, with its group length and CommandDataSetType; None values are left
    out. KeyError for a keyword that is no command element."""
    fields = {**command, "CommandDataSetType": 0x0001 if has_dataset else _NO_DATA_SET}
    elements = []
    for keyword, value in fields.items():
        if value is None:
            continue
        element, vr = _FIELDS[keyword]
        if vr == "US":
            data = struct.pack("<H", value)
        else:
            data = str(value).encode("ascii")
            if len(data) % 2:
                data += b"\x00" if vr == "UI" else b" "
        elements.append((element, data))
    elements.sort()
    body = b"".join(_ELEMENT.pack(0, e, len(d)) + d for e, d in elements)
    return _ELEMENT.pack(0, 0, 4) + struct.pack("<L", len(body)) + body


def decode_command(data: bytes) -> dict[str, Any]:
    """The known elements of a command set (others are skipped); ValueError when it is not
    one."""
    command: dict[str, Any] = {}
    offset = 0
    while offset < len(data):
        if offset + 8 > len(data):
            raise ValueError("truncated command element")
        group, element, length = _ELEMENT.unpack_from(data, offset)
        value = data[offset + 8:offset + 8 + length]
        offset += 8 + length
        if group != 0 or len(value) != length:
            raise ValueError("not a command set")
        known = _BY_ELEMENT.get(element)
        if known is None:
            continue
        keyword, vr = known
        if vr == "US":
            if length != 2:
                raise ValueError(f"{keyword}: not a US value")
            command[keyword] = struct.unpack("<H", value)[0]
        else:
            command[keyword] = value.decode("ascii", "replace").rstrip("\x00 ").lstrip(" ")
    if "CommandField" not in command or "CommandDataSetType" not in command:
        raise ValueError("a command set without CommandField or CommandDataSetType")
    return command


def has_dataset(command: Mapping[str, Any]) -> bool:
    return command["CommandDataSetType"] != _NO_DATA_SET


def fragments(command: bytes, dataset: bytes | None, max_pdu: int) -> Iterator[bytes]:
    """Presentation data values (control header + data) of a message, each fitting a P-DATA-TF
    PDU of at most `max_pdu` bytes (0: no limit)."""
    size = max_pdu - 6 if max_pdu else max(len(command), len(dataset or b""), 1)
    for control, data in ((0x01, command), (0x00, dataset)):
        if data is None:
            continue
        for start in range(0, max(len(data), 1), size):
            last = start + size >= len(data)
            yield bytes([control | (0x02 if last else 0)]) + data[start:start + size]
