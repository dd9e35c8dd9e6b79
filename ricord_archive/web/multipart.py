"""Reading multipart request bodies as real clients send them.

aiohttp's reader already takes header names in any case, LF-only line ends in part headers
and transport padding (spaces and tabs) after a boundary. It refuses boundaries longer than
RFC 2046's 70 characters, and Orthanc 1.10's DICOMweb client sends 73 (two UUIDs joined by a
dash): nothing is ambiguous about a longer one, so it is taken, up to a sane cap.
"""

from __future__ import annotations

from aiohttp import MultipartReader, web

MAX_BOUNDARY = 200  # characters; RFC 2046 says 70


class _LenientReader(MultipartReader):
    def _get_boundary(self) -> str:
        boundary = self._mimetype.parameters["boundary"]
        if not 0 < len(boundary) <= MAX_BOUNDARY:
            raise ValueError(f"a boundary is 1 to {MAX_BOUNDARY} characters")
        return boundary


def reader(request: web.Request) -> MultipartReader:
    """The body of a multipart request, part by part (ValueError when it has no usable
    boundary)."""
    return _LenientReader(request.headers, request.content)
