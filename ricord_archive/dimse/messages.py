"""Data sets in and out of DIMSE messages, in the transfer syntax of their presentation context
(pynetdicom's codecs)."""

from __future__ import annotations

from io import BytesIO

from pydicom.dataset import Dataset
from pynetdicom.dsutils import create_file_meta, decode, encode, encode_file_meta
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
    """A C-STORE's data set as a Part 10 file: file meta built from the request and the
    context's transfer syntax."""
    meta = create_file_meta(
        sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid,  # type: ignore[arg-type]
        transfer_syntax=context.transfer_syntax[0],
    )
    return b"".join((_PREAMBLE, encode_file_meta(meta), dataset))
