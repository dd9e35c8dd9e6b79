"""DICOM JSON (PS3.18 Annex F) of one encoded element value, as `dicom.json.to_json` gives it
through pydicom. Pure.

Common values (ASCII text, numbers, binary) are rendered here directly; anything else (person
names, tags, non-ASCII text, numbers pydicom might read otherwise) is handed to pydicom for that
one element, so the result is pydicom's by construction.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from struct import Struct
from typing import Any

from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.tag import BaseTag

from ricord_archive.dicom.json import BULK_DATA_THRESHOLD

BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_INLINE_LIMIT = (BULK_DATA_THRESHOLD // 4) * 3  # larger binary values become a BulkDataURI
_NUMBERS = {vr: Struct("<" + code) for vr, code in (
    ("US", "H"), ("SS", "h"), ("UL", "L"), ("SL", "l"), ("FL", "f"), ("FD", "d"),
    ("SV", "q"), ("UV", "Q"),
)}
_DS = re.compile(r" *[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)? *\Z")
_IS = re.compile(r" *[+-]?\d+ *\Z")


def _plain(raw: bytes) -> str | None:
    """The value as text if it is ASCII without escape sequences, else None."""
    return raw.decode("ascii") if raw.isascii() and b"\x1b" not in raw else None


def _split_stripped(text: str) -> list[str]:  # AS CS DA DT TM UI: trailing padding off first
    return text.rstrip(" \x00").split("\\")


def _uids(text: str) -> list[str]:  # UI: and each UID stripped, as pydicom's UID class does
    return [value.strip() for value in text.rstrip(" \x00").split("\\")]


def _split_each(text: str) -> list[str]:  # SH LO UC: each value's trailing padding off
    return [value.rstrip("\x00 ") for value in text.split("\\")]


def _single(text: str) -> list[str]:  # ST LT UT: one value
    return [text.rstrip("\x00 ")]


_TEXT: dict[str, Callable[[str], list[str]]] = {
    "AS": _split_stripped, "CS": _split_stripped, "DA": _split_stripped,
    "DT": _split_stripped, "TM": _split_stripped, "UI": _uids,
    "SH": _split_each, "LO": _split_each, "UC": _split_each,
    "ST": _single, "LT": _single, "UT": _single,
    "UR": lambda text: [text.rstrip()],
    "AE": lambda text: [value.strip() for value in text.split("\\")],
}


class BulkData(dict):
    """A JSON element whose BulkDataURI is filled in once the instance's path is known."""


def render(tag: int, vr: str, raw: bytes, encodings: list[str] | None) -> dict[str, Any]:
    """The JSON of one element value; raises whatever pydicom raises for a value it cannot
    render (the caller leaves the element out, as `to_json` does)."""
    if vr in BINARY_VRS:
        if not raw:
            return {"vr": vr}
        if len(raw) > _INLINE_LIMIT:
            return BulkData(vr=vr, BulkDataURI=tag)
        return {"vr": vr, "InlineBinary": base64.b64encode(raw).decode("ascii")}
    if not raw:
        return {"vr": vr}
    values = _fast(vr, raw)
    if values is None:
        return _pydicom(tag, vr, raw, encodings)
    if not values or values == [""]:
        return {"vr": vr}
    return {"vr": vr, "Value": values}


def _fast(vr: str, raw: bytes) -> list[Any] | None:
    number = _NUMBERS.get(vr)
    if number is not None:
        size = number.size
        if len(raw) % size:
            return None
        return [value for (value,) in number.iter_unpack(raw)]
    text = _plain(raw)
    if text is None:
        return None
    split = _TEXT.get(vr)
    if split is not None:
        return split(text)
    if vr == "DS":
        items = text.strip().rstrip(" \x00").split("\\")
        if all(_DS.match(item) for item in items):
            return [float(item) for item in items]
    elif vr == "IS":
        items = text.rstrip(" \x00").split("\\")
        if all(_IS.match(item) for item in items):
            return [int(item) for item in items]
    return None


def _no_bulk(element: Any) -> str:
    raise ValueError("binary values are rendered by element_json")


def _pydicom(tag: int, vr: str, raw: bytes, encodings: list[str] | None) -> dict[str, Any]:
    element = convert_raw_data_element(
        RawDataElement(BaseTag(tag), vr, len(raw), raw, 0, False, True), encoding=encodings
    )
    return element.to_json_dict(_no_bulk, BULK_DATA_THRESHOLD)


def single_value(vr: str, raw: bytes) -> str | int | None:
    """A value as `index_record` reads it from pydicom (str of the value), for one-valued
    ASCII text and US; None when empty. Anything else raises ValueError."""
    if not raw:
        return None
    if vr == "US":
        if len(raw) != 2:
            raise ValueError("not one US value")
        return _NUMBERS["US"].unpack(raw)[0]
    text = _plain(raw)
    split = _TEXT.get(vr) if vr != "IS" else _split_stripped
    if text is None or split is None:
        raise ValueError("not plain text")
    values = split(text)
    if len(values) != 1:
        raise ValueError("multi-valued")
    if vr == "IS" and not _IS.match(values[0]):  # pydicom may refuse to read it as a number
        raise ValueError("not a plain integer")
    return values[0]
