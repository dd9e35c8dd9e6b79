"""Frames and transfer syntaxes of stored objects: read a frame from its known offset without
parsing the object, decode it, or re-encode a whole object. Pure functions over readable
buffers; the retrieve service opens the files."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from io import BytesIO
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.encaps import generate_frames
from pydicom.pixels import pixel_array
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ricord_archive.errors import BadRequest, NotAcceptable, NotFound

# What an object can be re-encoded into on request (besides its stored transfer syntax).
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
STORED = "*"  # a transfer syntax a client accepts: the stored one, whatever it is


def choose_transfer_syntax(stored: str, acceptable: Collection[str]) -> str | None:
    """The transfer syntax to send an object stored in `stored` in (WADO-RS, C-GET, C-MOVE):
    the stored one when acceptable (or `STORED` is), its bytes sent as they are; else the first
    acceptable one it can be re-encoded into, in the order of `acceptable` when it has one (a
    client's Accept), else in the archive's (the contexts a DIMSE peer accepted); None when
    there is none."""
    if STORED in acceptable or stored in acceptable:
        return stored
    ordered = acceptable if isinstance(acceptable, Sequence) else UNCOMPRESSED
    return next((s for s in ordered if s in UNCOMPRESSED and s in acceptable), None)


# Media types of compressed frames (PS3.18 Table 8.7.3-2), by transfer syntax.
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx", "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


def frame_size(rows: int, columns: int, samples: int, bits_allocated: int) -> int:
    return rows * columns * samples * max(bits_allocated, 8) // 8


def parse_frame_list(text: str) -> list[int]:
    """`1,3,5` to frame numbers; 400 for anything else."""
    parts = text.split(",")
    if len(parts) > 10_000 or not all(p.isascii() and p.isdigit() and len(p) < 9 for p in parts):
        raise BadRequest("frames are a comma-separated list of frame numbers")
    numbers = [int(p) for p in parts]
    if min(numbers) < 1:
        raise BadRequest("frame numbers start at 1")
    return numbers


def check_frame_numbers(numbers: list[int], number_of_frames: int) -> None:
    if max(numbers) > number_of_frames:
        raise NotFound(f"the instance has {number_of_frames} frame(s)")


def native_frame(stream: BinaryIO, value_offset: int, size: int, number: int) -> bytes:
    """Frame `number` (1-based) of uncompressed pixel data, read at its offset."""
    stream.seek(value_offset + (number - 1) * size)
    return stream.read(size)


def encapsulated_frames(
    stream: BinaryIO, value_offset: int, number_of_frames: int, numbers: list[int], big: bool
) -> dict[int, bytes]:
    """The wanted frames (1-based) of encapsulated pixel data, as stored (still compressed):
    fragment headers are walked, no pixel is decoded."""
    stream.seek(value_offset)
    wanted, found = set(numbers), {}
    frames = generate_frames(
        stream, number_of_frames=number_of_frames, endianness=">" if big else "<"
    )
    for number, frame in enumerate(frames, start=1):
        if number in wanted:
            found[number] = frame
            if len(found) == len(wanted):
                break
    return found


def decoded_frame(source: str | BinaryIO, number: int) -> np.ndarray:
    """Frame `number` (1-based) decoded to pixel values (only that frame is decoded)."""
    try:
        return pixel_array(source, index=number - 1)
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        raise NotAcceptable("the stored pixel data cannot be decoded here") from exc


def as_little_endian_bytes(array: np.ndarray) -> bytes:
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def transcode(source: str | BinaryIO, target: str) -> bytes:
    """The whole object re-encoded in `target`: decompressed if needed, never lossy."""
    if target not in UNCOMPRESSED:
        raise NotAcceptable(f"transfer syntax {target} cannot be produced from this object")
    dataset = pydicom.dcmread(source)
    if UID(dataset.file_meta.TransferSyntaxUID).is_compressed:
        try:
            dataset.decompress(generate_instance_uid=False)  # the same instance, decoded
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            raise NotAcceptable("the stored pixel data cannot be decompressed here") from exc
    dataset.file_meta.TransferSyntaxUID = UID(target)
    out = BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()
