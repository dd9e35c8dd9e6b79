"""Reading and writing encoded DICOM elements without pydicom: the ingest hot path. Pure.

`tokenize` reads a Part 10 object in Explicit or Implicit VR Little Endian (pixel data native
or encapsulated) once, into a tree of element positions; values are not decoded. Anything it
is not sure to read exactly as pydicom does raises `Unhandled`: such an object takes the
pydicom path (`dicom.io.parse`), which decides whether it is valid at all.
"""

from __future__ import annotations

from functools import lru_cache
from struct import Struct

from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR
from pydicom.uid import UID
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
PIXEL_DATA = 0x7FE00010
_CHARSET = 0x00080005
UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_SEQUENCE_END_BYTES = b"\xfe\xff\xdd\xe0"
_TAG = Struct("<HH")
_US = Struct("<H")
_UL = Struct("<L")
_KNOWN_VRS = {vr.encode(): vr for vr in (
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF",
    "OL", "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN",
    "UR", "US", "UT", "UV",
)}
LONG_VRS = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)


class Unhandled(Exception):
    """The walker does not handle this object: the pydicom path takes it."""


class Element:
    """One encoded element: its tag, VR as encoded (None: implicit VR), where its header and
    value start, where its value ends, and its items if it is a sequence."""

    __slots__ = ("items", "start", "tag", "undefined", "vend", "vr", "vstart")

    def __init__(self, tag: int, vr: str | None, start: int, vstart: int, vend: int,
                 undefined: bool, items: list[Item] | None) -> None:
        self.tag = tag
        self.vr = vr
        self.start = start
        self.vstart = vstart
        self.vend = vend
        self.undefined = undefined
        self.items = items


class Item:
    __slots__ = ("elements", "undefined")

    def __init__(self, elements: list[Element], undefined: bool) -> None:
        self.elements = elements
        self.undefined = undefined


class Parsed:
    """A tokenized Part 10 object."""

    __slots__ = ("compressed", "data", "elements", "implicit", "top", "transfer_syntax")

    def __init__(self, data: bytes, transfer_syntax: str, implicit: bool, compressed: bool,
                 elements: list[Element]) -> None:
        self.data = data
        self.transfer_syntax = transfer_syntax
        self.implicit = implicit
        self.compressed = compressed
        self.elements = elements
        self.top = {element.tag: element for element in elements}

    def value(self, element: Element) -> bytes:
        return self.data[element.vstart:element.vend]


@lru_cache(maxsize=64)
def _syntax(uid: str) -> tuple[bool, bool]:
    """(implicit, compressed) of a transfer syntax the walker reads, else Unhandled."""
    if uid == IMPLICIT_VR_LITTLE_ENDIAN:
        return True, False
    if not uid.isascii():
        raise Unhandled("transfer syntax")
    syntax = UID(uid)
    if (not syntax.is_transfer_syntax or not syntax.is_little_endian or syntax.is_implicit_VR
            or syntax.is_deflated):
        raise Unhandled("transfer syntax")
    return False, syntax.is_compressed


@lru_cache(maxsize=8192)
def implicit_vr(tag: int) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def tokenize(data: bytes) -> Parsed:
    """Tokenize a Part 10 object (preamble and file meta required); Unhandled if unusual."""
    end = len(data)
    if end < 144 or data[128:132] != b"DICM":
        raise Unhandled("no preamble")
    pos, syntax, meta_end = 132, None, None
    while pos + 8 <= end and data[pos:pos + 2] == b"\x02\x00":
        element, pos = _explicit(data, pos, end)
        if element.tag == 0x00020000:
            if element.vr != "UL" or element.vend - element.vstart != 4:
                raise Unhandled("file meta")
            meta_end = pos + _UL.unpack_from(data, element.vstart)[0]
        elif element.tag == 0x00020010:
            syntax = data[element.vstart:element.vend].decode("latin-1").rstrip(" \x00")
        elif element.vr == "SQ" or element.undefined:
            raise Unhandled("file meta")
    if syntax is None or meta_end not in (None, pos):  # the group length, if any, must fit
        raise Unhandled("file meta")
    implicit, compressed = _syntax(syntax)
    reader = _Reader(data, implicit)
    elements, pos = reader.dataset(pos, end, False, 0)
    return Parsed(data, syntax, implicit, compressed, elements)


def _explicit(data: bytes, pos: int, end: int) -> tuple[Element, int]:
    """One Explicit VR Little Endian element header (not a sequence's content)."""
    if pos + 8 > end:
        raise Unhandled("truncated")
    group, number = _TAG.unpack_from(data, pos)
    vr = _KNOWN_VRS.get(data[pos + 4:pos + 6])
    if vr is None:
        raise Unhandled("unknown VR")
    if vr in LONG_VRS:
        if data[pos + 6:pos + 8] != b"\x00\x00" or pos + 12 > end:
            raise Unhandled("header")
        length = _UL.unpack_from(data, pos + 8)[0]
        vstart = pos + 12
    else:
        length = _US.unpack_from(data, pos + 6)[0]
        vstart = pos + 8
    undefined = length == UNDEFINED
    vend = vstart if undefined else vstart + length
    if vend > end:
        raise Unhandled("value past the end")
    return Element(group << 16 | number, vr, pos, vstart, vend, undefined, None), vend


class _Reader:
    def __init__(self, data: bytes, implicit: bool) -> None:
        self.data = data
        self.implicit = implicit

    def dataset(self, pos: int, end: int, delimited: bool, depth: int
                ) -> tuple[list[Element], int]:
        """Elements from `pos` to `end`, or to an item delimiter if `delimited`."""
        data, implicit = self.data, self.implicit
        elements: list[Element] = []
        last = -1
        while pos < end:
            if pos + 8 > end:
                raise Unhandled("trailing bytes")
            group, number = _TAG.unpack_from(data, pos)
            tag = group << 16 | number
            if group == 0xFFFE:
                if (delimited and tag == _ITEM_END
                        and data[pos + 4:pos + 8] == b"\x00\x00\x00\x00"):
                    return elements, pos + 8
                raise Unhandled("delimiter")
            if implicit:
                length = _UL.unpack_from(data, pos + 4)[0]
                undefined = length == UNDEFINED
                vstart = pos + 8
                vend = vstart if undefined else vstart + length
                if vend > end:
                    raise Unhandled("value past the end")
                element = Element(tag, None, pos, vstart, vend, undefined, None)
            else:
                element, _ = _explicit(data, pos, end)
            if tag <= last:
                raise Unhandled("tags out of order")
            last = tag
            if tag == _CHARSET:
                _check_charset(data[element.vstart:element.vend])
            pos = self._value(element, end, depth)
            elements.append(element)
        if delimited:
            raise Unhandled("undelimited item")
        return elements, pos

    def _value(self, element: Element, end: int, depth: int) -> int:
        """Read what follows the header (items, encapsulated pixel data); the position after."""
        vr = element.vr if element.vr is not None else implicit_vr(element.tag)
        if element.vr == "UN" and element.undefined:
            raise Unhandled("UN of undefined length")
        if vr == "SQ" or (element.undefined and vr is None and self._item_follows(element)):
            element.items, after = self._items(element, end, depth)
            return after
        if not element.undefined:
            return element.vend
        if element.tag != PIXEL_DATA or depth or self.implicit or vr not in ("OB", "OW"):
            raise Unhandled("undefined length")
        found = self.data.find(_SEQUENCE_END_BYTES, element.vstart, end)
        if found < 0 or found + 8 > end or self.data[found + 4:found + 8] != bytes(4):
            raise Unhandled("undelimited pixel data")
        element.vend = found
        return found + 8

    def _item_follows(self, element: Element) -> bool:
        return self.data[element.vstart:element.vstart + 4] == b"\xfe\xff\x00\xe0"

    def _items(self, element: Element, end: int, depth: int) -> tuple[list[Item], int]:
        data = self.data
        pos = element.vstart
        stop = end if element.undefined else element.vend
        items: list[Item] = []
        while True:
            if not element.undefined and pos == stop:
                return items, pos
            if pos + 8 > stop:
                raise Unhandled("truncated sequence")
            group, number = _TAG.unpack_from(data, pos)
            tag = group << 16 | number
            length = _UL.unpack_from(data, pos + 4)[0]
            if tag == _SEQUENCE_END and element.undefined:
                if length:
                    raise Unhandled("delimiter length")
                element.vend = pos
                return items, pos + 8
            if tag != _ITEM:
                raise Unhandled("not an item")
            if length == UNDEFINED:
                members, pos = self.dataset(pos + 8, stop, True, depth + 1)
                items.append(Item(members, True))
            else:
                if pos + 8 + length > stop:
                    raise Unhandled("item past the end")
                members, pos = self.dataset(pos + 8, pos + 8 + length, False, depth + 1)
                items.append(Item(members, False))


def _check_charset(raw: bytes) -> None:
    """pydicom reads every data set's Specific Character Set as it reads the data set, and
    fails the whole object on one it cannot look up."""
    names = strings(raw)
    try:
        convert_encodings(names[0] if len(names) == 1 else names)
    except Exception as exc:
        raise Unhandled("character set") from exc


def header(tag: int, vr: str | None, length: int) -> bytes:
    """The encoded header of an element (`vr` None: implicit VR)."""
    if vr is None:
        return _TAG.pack(tag >> 16, tag & 0xFFFF) + _UL.pack(length)
    if vr in LONG_VRS:
        return _TAG.pack(tag >> 16, tag & 0xFFFF) + vr.encode() + b"\x00\x00" + _UL.pack(length)
    return _TAG.pack(tag >> 16, tag & 0xFFFF) + vr.encode() + _US.pack(length)


ITEM_UNDEFINED = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def item_header(length: int) -> bytes:
    return b"\xfe\xff\x00\xe0" + _UL.pack(length)


def encode_text(vr: str, values: str | list[str] | None) -> bytes:
    """A text value as pydicom writes it: values joined by backslashes, padded to even length
    (UI with a NUL, others with a space). Non-ASCII text is Unhandled."""
    if values is None:
        return b""
    text = values if isinstance(values, str) else "\\".join(values)
    if not text.isascii():
        raise Unhandled("non-ASCII value")
    raw = text.encode("ascii")
    if len(raw) % 2:
        raw += b"\x00" if vr == "UI" else b" "
    return raw


def strings(raw: bytes) -> list[str]:
    """A text value (AS, CS, DA, DT, TM, UI) split as pydicom reads it, trailing padding off."""
    return raw.decode("latin-1").rstrip(" \x00").split("\\")


def file_meta(sop_class_uid: str, sop_uid: str, syntax: str, implementation_uid: str,
              implementation_name: str) -> bytes:
    """The file meta information group as `dicom.io.serialize` writes it."""
    body = b"".join(
        header(tag, vr, len(value)) + value for tag, vr, value in (
            (0x00020001, "OB", b"\x00\x01"),
            (0x00020002, "UI", encode_text("UI", sop_class_uid)),
            (0x00020003, "UI", encode_text("UI", sop_uid)),
            (0x00020010, "UI", encode_text("UI", syntax)),
            (0x00020012, "UI", encode_text("UI", implementation_uid)),
            (0x00020013, "SH", encode_text("SH", implementation_name)),
        )
    )
    return header(0x00020000, "UL", 4) + _UL.pack(len(body)) + body
