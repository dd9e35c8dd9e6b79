"""DICOM JSON (PS3.18 Annex F) to the Native DICOM Model XML (PS3.19 A.1). Pure."""

from __future__ import annotations

import re
from typing import Any
from xml.etree import ElementTree as ET

from pydicom.datadict import keyword_for_tag

_NAME_PARTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")
# Characters XML 1.0 cannot hold (controls other than tab, LF and CR; lone surrogates; U+FFFE/F):
# a stored value may contain them, and one of them would make the whole document unparseable.
_NOT_XML = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_text(value: Any) -> str:
    return _NOT_XML.sub("\ufffd", "" if value is None else str(value))


def _person_name(parent: ET.Element, number: int, value: dict[str, str]) -> None:
    name = ET.SubElement(parent, "PersonName", number=str(number))
    for group in ("Alphabetic", "Ideographic", "Phonetic"):
        if group in value:
            element = ET.SubElement(name, group)
            for part, text in zip(_NAME_PARTS, value[group].split("^"), strict=False):
                if text:
                    ET.SubElement(element, part).text = _xml_text(text)


def _attribute(parent: ET.Element, tag: str, body: dict[str, Any]) -> None:
    attributes = {"tag": tag, "vr": body.get("vr", "UN")}
    keyword = keyword_for_tag(int(tag, 16))
    if keyword:
        attributes["keyword"] = keyword
    element = ET.SubElement(parent, "DicomAttribute", attributes)
    if "BulkDataURI" in body:
        ET.SubElement(element, "BulkData", uri=_xml_text(body["BulkDataURI"]))
    elif "InlineBinary" in body:
        ET.SubElement(element, "InlineBinary").text = body["InlineBinary"]
    for number, value in enumerate(body.get("Value", []), start=1):
        if body.get("vr") == "SQ":
            _dataset(ET.SubElement(element, "Item", number=str(number)), value)
        elif body.get("vr") == "PN" and isinstance(value, dict):
            _person_name(element, number, value)
        else:
            ET.SubElement(element, "Value", number=str(number)).text = _xml_text(value)


def _dataset(parent: ET.Element, document: dict[str, Any]) -> None:
    for tag in sorted(document):
        _attribute(parent, tag, document[tag])


def to_xml(document: dict[str, Any]) -> bytes:
    """One dataset as a NativeDicomModel document (UTF-8, with declaration)."""
    root = ET.Element("NativeDicomModel", {"xml:space": "preserve"})
    _dataset(root, document)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)
