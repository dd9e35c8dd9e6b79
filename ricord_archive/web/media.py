"""Media types: parsing Content-Type and Accept leniently (OHIF sends `type=` unquoted)."""

from __future__ import annotations

from dataclasses import dataclass

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"


@dataclass(frozen=True)
class MediaRange:
    type: str
    params: dict[str, str]


def parse_media_type(value: str) -> MediaRange:
    head, *rest = value.split(";")
    params = {}
    for item in rest:
        name, _, raw = item.strip().partition("=")
        if name:
            params[name.strip().lower()] = raw.strip().strip('"').strip()
    return MediaRange(head.strip().lower(), params)


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of an Accept header, split on commas outside quotes."""
    if not header:
        return [MediaRange("*/*", {})]
    ranges: list[str] = []
    current: list[str] = []
    quoted = False
    for char in header:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            ranges.append("".join(current))
            current = []
        else:
            current.append(char)
    ranges.append("".join(current))
    return [parse_media_type(r) for r in ranges if r.strip()]


def accepts(header: str | None, *types: str) -> bool:
    """Whether the Accept header admits one of `types` (single-part media types)."""
    for media in parse_accept(header):
        if media.type in ("*/*", "application/*") or media.type in types:
            return True
    return False


def accepts_multipart(header: str | None, part_type: str) -> bool:
    """Whether the Accept header admits multipart/related with parts of `part_type`
    (an absent `type=` parameter admits any)."""
    for media in parse_accept(header):
        if media.type == "*/*":
            return True
        if media.type == "multipart/related" and media.params.get("type", part_type) in (
            part_type, "*/*", "application/*"
        ):
            return True
    return False
