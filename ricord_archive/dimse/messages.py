"""Data sets in and out of DIMSE messages, in the transfer syntax of their presentation context
(pynetdicom's codecs), and a C-STORE's data set as a Part 10 file."""

from __future__ import annotations

import struct
from io import BytesIO

from pydicom.dataset import Dataset
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dsutils import decode, encode
from pynetdicom.presentation import PresentationContext

_PREAMBLE = b"\x00" * 128 + b"DICM"


def decoded(data: bytes | None, context: PresentationContext) -> Dataset:
    """A request's identifier (ValueError when there is none)."""
    if data is None:
        raise ValueError("no identifier")
    syntax = context.transfer_syntax[0]
    return decode(BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian,
                  syntax.is_deflated)


def encoded(dataset: Dataset, context: PresentationContext) -> bytes:
    """A data set in the context's transfer syntax (ValueError when it cannot be encoded)."""
    syntax = context.transfer_syntax[0]
    data = encode(dataset, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
    if data is None:
        raise ValueError("the data set cannot be encoded in the context's transfer syntax")
    return data


def part10(sop_class_uid: str, sop_instance_uid: str, context: PresentationContext,
           dataset: bytes) -> bytes:
    """A C-STORE's data set as a Part 10 file: file meta (Explicit VR Little Endian, as
    pynetdicom writes it) built from the request and the context's transfer syntax."""
    elements = b"".join((
        b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01",  # FileMetaInformationVersion
        _meta(0x0002, "UI", sop_class_uid),
        _meta(0x0003, "UI", sop_instance_uid),
        _meta(0x0010, "UI", str(context.transfer_syntax[0])),
        _meta(0x0012, "UI", PYNETDICOM_IMPLEMENTATION_UID),
        _meta(0x0013, "SH", PYNETDICOM_IMPLEMENTATION_VERSION),
    ))
    group_length = b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<L", len(elements))
    return b"".join((_PREAMBLE, group_length, elements, dataset))


def _meta(element: int, vr: str, value: str) -> bytes:
    data = value.encode("ascii")
    if len(data) % 2:
        data += b"\x00" if vr == "UI" else b" "
    return struct.pack("<HH2sH", 0x0002, element, vr.encode(), len(data)) + data
