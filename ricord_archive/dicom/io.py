"""Parsing and writing DICOM Part 10 bytes. Pure: bytes in, bytes out.

pydicom's many parse errors become one `InvalidObject` here, at the edge, with a message that
names no value from the object.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from io import BytesIO
from typing import BinaryIO, Literal

import pydicom
import pydicom.config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from ricord_archive import __version__
from ricord_archive.errors import InvalidObject, ObjectTooLarge

# Our implementation identity in the file meta: a fixed 2.25 UID (derived once from a UUID).
IMPLEMENTATION_CLASS_UID = UID("2.25.160133569416932096125839520520128475921")
IMPLEMENTATION_VERSION_NAME = f"RICORD_{__version__.replace('.', '')}"[:16]
_PREAMBLE = b"\x00" * 128


def configure_pydicom() -> None:
    """pydicom's global settings, set once at start-up: its value-validation messages quote
    the offending value (PHI), so they are neither raised on read nor logged."""
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?$")
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)


def check_size(data: bytes, max_bytes: int) -> None:
    if len(data) > max_bytes:
        raise ObjectTooLarge(f"object of {len(data)} bytes exceeds the limit of {max_bytes}")


def parse(data: bytes, max_bytes: int) -> Dataset:
    """Parse a DICOM Part 10 object (preamble optional, file meta required)."""
    check_size(data, max_bytes)
    try:
        dataset = pydicom.dcmread(BytesIO(data), force=False)
        meta = dataset.file_meta
        if "TransferSyntaxUID" not in meta:
            raise InvalidObject("the object has no transfer syntax in its file meta")
        for required in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if not str(dataset.get(required, "") or "").strip():
                raise InvalidObject(f"the object has no {required}")
        _check_complete(dataset)
    except InvalidObject:
        raise
    except (InvalidDicomError, EOFError) as exc:
        raise InvalidObject("not a DICOM Part 10 object") from exc
    except Exception as exc:  # pydicom raises many kinds; none of them may escape raw
        raise InvalidObject(f"unreadable DICOM object ({type(exc).__name__})") from exc
    return dataset


_UNDEFINED_LENGTH = 0xFFFFFFFF


def _check_complete(dataset: Dataset) -> None:
    """Refuse an object in which a value's declared length runs past the end of the data.

    pydicom reads such a value as the fewer bytes that are there (a truncated object, or a
    corrupt length field such as 0xFFFFFFF0) and would let it be stored. Raw (undecoded)
    values are compared with their declared lengths, at every depth; only sequences are
    decoded to look inside (de-identification decodes them anyway), other values stay raw.
    Undefined lengths never delimited already fail in pydicom (EOFError)."""
    for tag, element in list(dataset._dict.items()):
        if isinstance(element, RawDataElement):
            if (element.length != _UNDEFINED_LENGTH and element.value is not None
                    and len(element.value) != element.length):
                raise InvalidObject("the object is truncated: a value runs past its end")
            vr = element.VR or _dictionary_vr(tag)  # no VR in the bytes: implicit VR
        else:
            vr = element.VR
        if vr == "SQ":
            for item in dataset[tag].value or ():
                _check_complete(item)


def _dictionary_vr(tag: int) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


@dataclass(frozen=True)
class PixelDataLocation:
    offset: int  # first byte of the Pixel Data value in the Part 10 bytes
    length: int | None  # None: encapsulated, undefined length


def pixel_data_location(data: bytes | BinaryIO) -> PixelDataLocation | None:
    """Where the top-level Pixel Data value starts, found by parsing the header only."""
    stream = BytesIO(data) if isinstance(data, bytes) else data
    dataset = pydicom.dcmread(stream, stop_before_pixels=True)
    start = stream.tell()
    header = stream.read(12)
    syntax = UID(dataset.file_meta.TransferSyntaxUID)
    order: Literal["little", "big"] = "little" if syntax.is_little_endian else "big"
    if len(header) < 8 or header[:4] != (0x7FE0).to_bytes(2, order) + (0x0010).to_bytes(2, order):
        return None
    if syntax.is_implicit_VR:
        length, value = int.from_bytes(header[4:8], order), start + 8
    else:
        length, value = int.from_bytes(header[8:12], order), start + 12
    return PixelDataLocation(value, None if length == 0xFFFFFFFF else length)


def serialize(dataset: Dataset, transfer_syntax: str) -> tuple[bytes, PixelDataLocation | None]:
    """Write `dataset` as Part 10 with a fresh file meta and a zeroed preamble; also say where
    its Pixel Data value starts. Pixel data is appended as is, not re-encoded by pydicom."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    dataset.file_meta = meta
    dataset.preamble = _PREAMBLE
    pixels = dataset.get(_PIXEL_DATA)
    last = max(dataset.keys(), default=None)
    appendable = (
        pixels is not None and last == _PIXEL_DATA and isinstance(pixels.value, bytes)
        and not UID(transfer_syntax).is_deflated
    )
    try:
        if appendable:
            del dataset[_PIXEL_DATA]
        out = BytesIO()
        try:
            dataset.save_as(out, enforce_file_format=True)
        finally:
            if appendable:
                dataset[_PIXEL_DATA] = pixels
    except Exception as exc:
        raise InvalidObject(f"the object cannot be re-encoded ({type(exc).__name__})") from exc
    if pixels is None:
        return out.getvalue(), None
    if not appendable:  # pixel data is not last, or not raw bytes: find it in what was written
        data = out.getvalue()
        return data, pixel_data_location(data)
    header, value, undefined = _pixel_data_header(dataset, pixels, UID(transfer_syntax))
    out.write(header)
    location = PixelDataLocation(out.tell(), None if undefined else len(value))
    out.write(value)
    if undefined:  # the encapsulated value ends with a sequence delimiter
        order: Literal["little", "big"] = (
            "little" if UID(transfer_syntax).is_little_endian else "big")
        out.write((0xFFFE).to_bytes(2, order) + (0xE0DD).to_bytes(2, order) + bytes(4))
    return out.getvalue(), location


_PIXEL_DATA = 0x7FE00010


def _pixel_data_header(
    dataset: Dataset, pixels: DataElement, syntax: UID
) -> tuple[bytes, bytes, bool]:
    """The encoded tag, VR and length of Pixel Data, its (even-length) value, and whether the
    length is undefined (encapsulated)."""
    order: Literal["little", "big"] = "little" if syntax.is_little_endian else "big"
    value = pixels.value
    undefined = syntax.is_compressed
    if len(value) % 2 and not undefined:
        value += b"\x00"
    tag = (0x7FE0).to_bytes(2, order) + (0x0010).to_bytes(2, order)
    length = (0xFFFFFFFF if undefined else len(value)).to_bytes(4, order)
    if syntax.is_implicit_VR:
        return tag + length, value, undefined
    vr = pixels.VR if pixels.VR in ("OB", "OW") else (
        "OB" if undefined or int(dataset.get("BitsAllocated", 16) or 16) <= 8 else "OW"
    )
    return tag + vr.encode("ascii") + bytes(2) + length, value, undefined
