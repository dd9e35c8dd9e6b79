"""The byte walker: de-identification of a tokenized object in one pass. Pure.

Each encoded element is looked at once and decided by `rules.Rules`, exactly as the pydicom
engine decides it; the walker emits, in the same pass, the de-identified Part 10 bytes (kept
elements and Pixel Data copied from the input by reference until the final join), the DICOM
JSON document and the index record. Whatever it cannot reproduce exactly raises `Unhandled`,
and the object takes the pydicom path.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pydicom.charset import convert_encodings
from pydicom.datadict import tag_for_keyword

from ricord_archive.deid.rules import (
    EMPTIED,
    DeidContext,
    Inserted,
    MapValues,
    Originals,
    Rules,
    SetValue,
    decision_vr,
    inserted,
)
from ricord_archive.dicom.element_json import BINARY_VRS, BulkData, render, single_value
from ricord_archive.dicom.io import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    PixelDataLocation,
)
from ricord_archive.dicom.json import (
    PIXEL_DATA_TAGS,
    InstanceRecord,
    instance_path,
    record_of,
)
from ricord_archive.dicom.tokens import (
    ITEM_END,
    ITEM_UNDEFINED,
    PIXEL_DATA,
    SEQUENCE_END,
    UNDEFINED,
    Element,
    Item,
    Parsed,
    Unhandled,
    encode_text,
    file_meta,
    header,
    item_header,
    strings,
)

_CHARSET = 0x00080005
_PIXEL_REPRESENTATION = 0x00280103
_PIXEL_TAGS = frozenset(int(tag, 16) for tag in PIXEL_DATA_TAGS)
_MAPPED_VRS = frozenset({"UI", "DA", "DT", "AS"})
_PREAMBLE = bytes(128) + b"DICM"
_RECURRING_SIZE = 64  # text and number values up to this size are rendered once (cached)
_RECORD_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
Encodings = tuple[str, ...] | None  # a data set's character sets (None: the default)


@dataclass(frozen=True)
class Admitted:
    """The original values the admission needs (never stored, logged or answered)."""

    sop_class_uid: str
    sop_uid: str
    study_uid: str
    patient_id: str
    burned_in_annotation: str
    issuer: str  # IssuerOfPatientID, "" when absent


@dataclass(frozen=True)
class Walked:
    """A de-identified object: its Part 10 bytes and what the index stores of it."""

    data: bytes
    transfer_syntax: str
    pixels: PixelDataLocation | None
    record: InstanceRecord
    document: dict[str, Any]


class _Out:
    """One output element: encoded chunks, their size, its JSON (None: left out) and, for
    top-level text, the value bytes."""

    __slots__ = ("chunks", "json", "pixels", "size", "tag", "undefined", "value", "vr")

    def __init__(self, tag: int, vr: str, chunks: list, size: int, json: dict | None,
                 value: Any = None, pixels: Element | None = None,
                 undefined: bool = False) -> None:
        self.tag = tag
        self.vr = vr
        self.chunks = chunks
        self.size = size
        self.json = json
        self.value = value
        self.pixels = pixels
        self.undefined = undefined  # a sequence of undefined length


@lru_cache(maxsize=256)
def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return tag


def _original(parsed: Parsed, keyword: str) -> str:
    """A top-level value of the original object as `str(dataset.get(keyword, ""))`."""
    element = parsed.top.get(_tag(keyword))
    if element is None:
        return ""
    vr = decision_vr(element.vr, element.tag)
    if element.vr not in (None, decision_vr(None, element.tag)):
        raise Unhandled("unexpected VR")
    try:
        value = single_value(vr, parsed.value(element))
    except ValueError as exc:
        raise Unhandled("value") from exc
    return "" if value is None else str(value)


def admitted(parsed: Parsed) -> Admitted:
    """The values admission decides by; Unhandled if a required UID is missing (pydicom's
    parse refuses such an object with its own message)."""
    uids = [_original(parsed, keyword) for keyword in (
        "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")]
    if not all(uid.strip() for uid in uids):
        raise Unhandled("a required UID is missing")
    return Admitted(uids[0], uids[1].strip(), uids[2].strip(),
                    _original(parsed, "PatientID").strip(),
                    _original(parsed, "BurnedInAnnotation"),
                    _original(parsed, "IssuerOfPatientID").strip())


def _encodings(parsed: Parsed, element: Element | None, inherited: Encodings) -> Encodings:
    if element is None:
        return inherited
    names = strings(parsed.value(element))
    if names == [""]:
        return inherited
    try:
        return tuple(convert_encodings(names))
    except Exception as exc:
        raise Unhandled("character set") from exc


class _Walker:
    def __init__(self, parsed: Parsed, rules: Rules) -> None:
        self.parsed = parsed
        self.view = memoryview(parsed.data)
        self.implicit = parsed.implicit
        self.rules = rules
        self.bulk: list[BulkData] = []
        representation = parsed.top.get(_PIXEL_REPRESENTATION)
        self.pixel_rep = None
        if representation is not None and representation.vend - representation.vstart == 2:
            self.pixel_rep = int.from_bytes(parsed.value(representation), "little")

    # ---- one dataset -------------------------------------------------------------------

    def dataset(self, elements: list[Element], encodings: Encodings, depth: int
                ) -> list[_Out]:
        out = []
        for element in elements:
            done = self.element(element, encodings, depth)
            if done is not None:
                out.append(done)
        return out

    def element(self, element: Element, encodings: Encodings, depth: int
                ) -> _Out | None:
        tag = element.tag
        vr = decision_vr(element.vr, tag)
        settled = self.rules.settled(tag, vr)
        if settled is False:
            return None
        if vr == "SQ":
            if element.items is None:
                raise Unhandled("sequence not read as one")
            fate = self.rules.sequence(tag)
            if fate is None:
                return None
            items = [] if fate == EMPTIED else element.items
            return self.sequence(tag, items, element.undefined, encodings, depth)
        if element.items is not None or element.vr == "UN":
            raise Unhandled("UN or items of a non-sequence kept")
        edit = True if settled else self.rules.edit(tag, vr)
        if edit is False:
            return None
        json_vr = self.json_vr(tag, vr, depth)
        if edit is True:
            return self.kept(element, json_vr, encodings, depth)
        if isinstance(edit, SetValue):
            return self.encoded(tag, vr, json_vr, encode_text(vr, edit.value), encodings)
        return self.mapped(element, vr, json_vr, edit, encodings, depth)

    def json_vr(self, tag: int, vr: str, depth: int) -> str:
        if len(vr) == 2:
            return vr
        if tag == PIXEL_DATA and self.implicit:
            return "OW"
        if vr == "US or SS" and depth == 0 and self.pixel_rep is not None:
            return "US" if self.pixel_rep == 0 else "SS"
        raise Unhandled("ambiguous VR")

    def kept(self, element: Element, vr: str, encodings: Encodings, depth: int) -> _Out:
        tag = element.tag
        value = self.view[element.vstart:element.vend]
        chunks: list[bytes | memoryview]
        if tag & 0xFFFF == 0 and tag >> 16 > 6:  # group lengths are not written, as pydicom
            chunks, size = [], 0
        else:
            chunks = [self.view[element.start:element.vend]]
            size = element.vend - element.start
            if element.undefined:  # encapsulated Pixel Data
                chunks.append(SEQUENCE_END)
                size += 8
        json = self.json(tag, vr, value, encodings, depth)
        pixels = element if tag == PIXEL_DATA and depth == 0 else None
        return _Out(tag, vr, chunks, size, json, value, pixels)

    def mapped(self, element: Element, vr: str, json_vr: str, edit: MapValues,
               encodings: Encodings, depth: int) -> _Out:
        if vr not in _MAPPED_VRS:
            raise Unhandled("rewrite of a value that is not text")
        values = strings(self.parsed.value(element))
        if values == [""]:
            return self.kept(element, json_vr, encodings, depth)
        new = [edit.fn(value) for value in values]
        return self.encoded(element.tag, vr, json_vr, encode_text(vr, new), encodings)

    def encoded(self, tag: int, vr: str, json_vr: str, value: bytes,
                encodings: Encodings) -> _Out:
        head = header(tag, None if self.implicit else vr, len(value))
        return _Out(tag, vr, [head, value], len(head) + len(value),
                    self.json(tag, json_vr, value, encodings, 1), value)

    def json(self, tag: int, vr: str, value: Any, encodings: Encodings, depth: int
             ) -> dict | None:
        try:
            if vr in BINARY_VRS:
                rendered = render(tag, vr, value, _listed(encodings))
            elif len(value) <= _RECURRING_SIZE:
                rendered = _render_recurring(tag, vr, bytes(value), encodings)
            else:
                rendered = render(tag, vr, bytes(value), _listed(encodings))
        except Exception:  # as to_json: an element pydicom cannot express is left out
            return None
        if depth == 0 and tag in _PIXEL_TAGS and "InlineBinary" in rendered:
            rendered = BulkData(vr=vr, BulkDataURI=tag)
        if isinstance(rendered, BulkData):
            self.bulk.append(rendered)
        return rendered

    def sequence(self, tag: int, items: list[Item], undefined: bool,
                 encodings: Encodings, depth: int) -> _Out:
        chunks: list = []
        size = 0
        documents: list[dict] | None = []
        for item in items:
            item_encodings = _encodings(
                self.parsed, next((e for e in item.elements if e.tag == _CHARSET), None),
                encodings,
            )
            body, body_size, document = _assemble(
                self.dataset(item.elements, item_encodings, depth + 1))
            if item.undefined:
                chunks += [ITEM_UNDEFINED, *body, ITEM_END]
                size += 16 + body_size
            else:
                chunks += [item_header(body_size), *body]
                size += 8 + body_size
            if document is None or documents is None:
                documents = None
            else:
                documents.append(document)
        return self.sequence_out(tag, chunks, size, documents, undefined)

    def sequence_out(self, tag: int, chunks: list, size: int, documents: list | None,
                     undefined: bool) -> _Out:
        head = header(tag, None if self.implicit else "SQ", UNDEFINED if undefined else size)
        if undefined:
            chunks.append(SEQUENCE_END)
            size += 8
        json = None if documents is None else {"vr": "SQ", "Value": documents}
        return _Out(tag, "SQ", [head, *chunks], len(head) + size, json, undefined=undefined)

    # ---- the attributes the archive sets -------------------------------------------------

    def insert(self, out: dict[int, _Out], attribute: Inserted) -> None:
        existing = out.get(attribute.tag)
        if existing is None and attribute.only_if_present:
            return
        vr = existing.vr if existing is not None else attribute.vr
        # a sequence already there keeps its length form, as pydicom keeps it
        undefined = existing is not None and existing.undefined
        encoded, value, json = _inserted(attribute.tag, vr, attribute.value, self.implicit,
                                         undefined)
        out[attribute.tag] = _Out(attribute.tag, vr, [encoded], len(encoded), json, value,
                                  undefined=undefined)


@lru_cache(maxsize=4096)
def _inserted(tag: int, vr: str, value: str | tuple | None, implicit: bool, undefined: bool
              ) -> tuple[bytes, bytes | None, dict | None]:
    """An inserted attribute, encoded (header and value), its value and its JSON. The same
    few values recur object after object, so they are encoded once (the JSON is shared: it
    is only ever serialized)."""
    if vr != "SQ":
        if len(vr) != 2 or (value is not None and not isinstance(value, str)):
            raise Unhandled("inserted value")
        raw = encode_text(vr, value)
        try:
            json = render(tag, vr, raw, None)
        except Exception:
            json = None
        return header(tag, None if implicit else vr, len(raw)) + raw, raw, json
    items = []
    documents: list[dict] | None = []
    for members in value or ():
        body = []
        document: dict | None = {}
        for member in sorted(members, key=lambda m: m.tag):
            encoded, _, json = _inserted(member.tag, member.vr, member.value, implicit, False)
            body.append(encoded)
            if json is None or document is None:
                document = None
            else:
                document[f"{member.tag:08X}"] = json
        joined = b"".join(body)
        items.append(item_header(len(joined)) + joined)
        documents = None if document is None or documents is None else [*documents, document]
    content = b"".join(items)
    head = header(tag, None if implicit else "SQ", UNDEFINED if undefined else len(content))
    encoded = head + content + (SEQUENCE_END if undefined else b"")
    return encoded, None, None if documents is None else {"vr": "SQ", "Value": documents}


@lru_cache(maxsize=8192)
def _render_recurring(tag: int, vr: str, raw: bytes, encodings: Encodings) -> dict:
    """The JSON of a short text or number value. Most such values recur object after object
    (modality, image type, spacing, the archive's own codes), so each is rendered once; the
    JSON is shared between documents, which are only ever serialized."""
    return render(tag, vr, raw, _listed(encodings))


def _listed(encodings: Encodings) -> list[str] | None:
    return None if encodings is None else list(encodings)


def _assemble(out: list[_Out]) -> tuple[list, int, dict | None]:
    chunks: list = []
    size = 0
    document: dict | None = {}
    for element in out:
        chunks += element.chunks
        size += element.size
        if element.json is None:
            document = None
        elif document is not None:
            document[f"{element.tag:08X}"] = element.json
    return chunks, size, document


def walk(parsed: Parsed, context: DeidContext) -> Walked:
    """De-identify a tokenized object; Unhandled if the pydicom path must take it."""
    originals = Originals(
        study_uid=_original(parsed, "StudyInstanceUID").strip(),
        accession=_original(parsed, "AccessionNumber").strip(),
        age=_original(parsed, "PatientAge").strip(),
        birth=_original(parsed, "PatientBirthDate").strip(),
        study_date=_original(parsed, "StudyDate").strip(),
    )
    walker = _Walker(parsed, Rules(context))
    encodings = _encodings(parsed, parsed.top.get(_CHARSET), None)
    out = {element.tag: element for element in walker.dataset(parsed.elements, encodings, 0)}
    for attribute in inserted(context, originals):
        walker.insert(out, attribute)
    elements = sorted(out.values(), key=lambda o: o.tag)
    if not all(_tag(keyword) in out for keyword in _RECORD_UIDS):
        raise Unhandled("a required UID is missing")

    def value(keyword: str) -> Any:
        element = out.get(_tag(keyword))
        if element is None or element.value is None:
            return None
        try:
            return single_value(element.vr, bytes(element.value))
        except ValueError as exc:
            raise Unhandled("record value") from exc

    record = record_of(value)
    meta = file_meta(record.sop_class_uid, record.sop_uid, parsed.transfer_syntax,
                     IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)
    chunks: list = [_PREAMBLE, meta]
    offset = len(_PREAMBLE) + len(meta)
    pixels = None
    document: dict[str, Any] = {}
    for index, element in enumerate(elements):
        if element.pixels is not None:
            last = index == len(elements) - 1
            pixels = _pixel_data(walker, element, last, offset, chunks)
            offset += element.size
        else:
            chunks += element.chunks
            offset += element.size
        if element.json is not None:
            document[f"{element.tag:08X}"] = element.json
    base = instance_path(record.study_uid, record.series_uid, record.sop_uid)
    for bulk in walker.bulk:
        bulk["BulkDataURI"] = f"{base}/bulkdata/{bulk['BulkDataURI']:08X}"
    return Walked(b"".join(chunks), parsed.transfer_syntax, pixels, record, document)


def _pixel_data(walker: _Walker, out: _Out, last: bool, offset: int, chunks: list
                ) -> PixelDataLocation:
    """Emit the top-level Pixel Data (as `dicom.io.serialize` writes it); where it lands."""
    element = out.pixels
    assert element is not None
    parsed = walker.parsed
    head_size = element.vstart - element.start
    if not last:
        chunks += out.chunks
        length = None if element.undefined else element.vend - element.vstart
        return PixelDataLocation(offset + head_size, length)
    if element.undefined != parsed.compressed:
        raise Unhandled("pixel data encoding does not match the transfer syntax")
    if element.vr not in (None, "OB", "OW"):
        raise Unhandled("pixel data VR")
    value = walker.view[element.vstart:element.vend]
    pad = b"\x00" if len(value) % 2 and not element.undefined else b""
    length = UNDEFINED if element.undefined else len(value) + len(pad)
    head = header(PIXEL_DATA, element.vr, length)
    chunks += [head, value, pad]
    if element.undefined:
        chunks.append(SEQUENCE_END)
    out.size = len(head) + len(value) + len(pad) + (8 if element.undefined else 0)
    return PixelDataLocation(offset + len(head), None if element.undefined else length)
