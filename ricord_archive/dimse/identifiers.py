"""C-FIND response identifiers encoded straight from the index's DICOM JSON. Pure.

Through pydicom each match became a `Dataset` (`Dataset.from_json`) and then bytes: about
0.2 ms a match, most of what a `findscu` process waits for beyond the association when a query
has many matches. The common case is encoded here: ASCII text, UIDs, dates and times, person
names as one alphabetic group, integer strings and binary integers, in Implicit or Explicit VR
Little Endian, no sequence. Anything else answers None and the match takes pydicom's path,
which stays the reference: tests/dimse/test_find_identifiers.py compares both byte for byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from struct import Struct
from typing import Any

from ricord_archive.dicom.tokens import Unhandled, encode_text, header

RESPONSE_CHARSET = "ISO_IR 192"  # what every C-FIND response declares
_CHARSET_TAG, _LEVEL_TAG = 0x00080005, 0x00080052
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI",
                       "UR", "UT"})
_INTEGERS = {vr: Struct("<" + code) for vr, code in (
    ("US", "H"), ("SS", "h"), ("UL", "L"), ("SL", "l"))}


def encodable(requested: Sequence[tuple[int, str]]) -> bool:
    """Whether the requested keys (tag, VR) allow this path at all (no sequence, no ambiguous
    VR)."""
    return all(len(vr) == 2 and vr != "SQ" for _, vr in requested)


def identifier(requested: Sequence[tuple[int, str]], level: str, document: dict[str, Any],
               implicit: bool) -> bytes | None:
    """The response identifier of one match: the requested keys (tag, VR as requested),
    filled from the match's DICOM JSON (empty where it has none), with SpecificCharacterSet
    and QueryRetrieveLevel; None when this path does not encode it exactly as pydicom."""
    try:
        elements = [(_CHARSET_TAG, "CS", encode_text("CS", RESPONSE_CHARSET)),
                    (_LEVEL_TAG, "CS", encode_text("CS", level))]
        for tag, vr in requested:
            found = document.get(f"{tag:08X}")
            if found is None:
                elements.append((tag, vr, b""))
                continue
            value = _value(found)
            if value is None:
                return None
            elements.append((tag, found["vr"], value))
    except Unhandled:  # non-ASCII text
        return None
    elements.sort()
    return b"".join(header(tag, None if implicit else vr, len(value)) + value
                    for tag, vr, value in elements)


def _value(element: dict[str, Any]) -> bytes | None:
    vr, values = element.get("vr", ""), element.get("Value")
    if "InlineBinary" in element or "BulkDataURI" in element:
        return None
    if not values:
        return b""
    if vr in _TEXT_VRS and all(isinstance(v, str) for v in values):
        return encode_text(vr, values)
    if vr == "PN" and all(isinstance(v, dict) and set(v) == {"Alphabetic"}
                          and isinstance(v["Alphabetic"], str) for v in values):
        return encode_text(vr, [v["Alphabetic"] for v in values])
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if vr == "IS":
            return encode_text(vr, [str(v) for v in values])
        number = _INTEGERS.get(vr)
        if number is not None:
            try:
                return b"".join(number.pack(v) for v in values)
            except Exception:  # struct.error: out of the VR's range
                return None
    return None
