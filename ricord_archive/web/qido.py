"""QIDO-RS: the six search resources, as DICOM JSON or multipart Native DICOM Model XML."""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import orjson
from aiohttp import web

from ricord_archive.dicom.xml import to_xml
from ricord_archive.errors import NotAcceptable
from ricord_archive.search.model import Level
from ricord_archive.search.qido import parse_qido
from ricord_archive.services.query import SearchResult
from ricord_archive.web import auth, context, http_audit
from ricord_archive.web.media import DICOM_JSON, DICOM_XML, accepts, accepts_multipart

_WARN_AGENT = re.compile(r"[A-Za-z0-9.:\[\]-]{1,300}")
_SCOPE_KEYS = {"study": "StudyInstanceUID", "series": "SeriesInstanceUID"}


def _retrieve_url(base: str, level: Level, document: dict) -> str | None:
    def uid(tag: str) -> str:
        return document[tag]["Value"][0]

    if level is Level.STUDY:
        return f"{base}/studies/{uid('0020000D')}"
    if level is Level.SERIES:
        return f"{base}/studies/{uid('0020000D')}/series/{uid('0020000E')}"
    if level is Level.INSTANCE:
        return (f"{base}/studies/{uid('0020000D')}/series/{uid('0020000E')}"
                f"/instances/{uid('00080018')}")
    return None


def _quoted(text: str) -> str:
    """`text` as the body of an HTTP quoted-string: ASCII, backslash and quote escaped."""
    ascii_text = text.encode("ascii", "backslashreplace").decode("ascii")
    return "".join(
        f"\\{c}" if c in '"\\' else c if c.isprintable() else repr(c)[1:-1] for c in ascii_text
    )


def _agent(base: str) -> str:
    """The warn-agent: the host and port the client reached (a pseudonym if it is odd)."""
    netloc = urlsplit(base).netloc
    return netloc if _WARN_AGENT.fullmatch(netloc) else "ricord-archive"


def _warning(agent: str, ignored: tuple[str, ...], more: int, at_least: bool) -> str | None:
    """The Warning header (RFC 7234 code 299, miscellaneous persistent warning) of a search:
    each parameter ignored, and how many matches lie past the page."""
    notes = [f'299 {agent} "ignored: {_quoted(note)}"' for note in ignored]
    if more:
        count = f"at least {more}" if at_least else str(more)
        notes.append(f'299 {agent} "{count} more matches: page with limit and offset"')
    return ", ".join(notes) or None


def _next_link(request: web.Request, base: str, token: str) -> str:
    """The Link header (RFC 8288) of the next page: the same request, its offset replaced by
    the cursor after this page."""
    params = [(k, v) for k, v in request.query.items() if k not in ("offset", "cursor")]
    origin = base.removesuffix(context.ROOT)
    return f'<{origin}{request.rel_url.with_query([*params, ("cursor", token)])}>; rel="next"'


def _multipart_xml(documents: list[dict]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f"--{boundary}\r\nContent-Type: {DICOM_XML}\r\n\r\n".encode("ascii") + to_xml(d) + b"\r\n"
        for d in documents
    ]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode("ascii")
    return body, f'multipart/related; type="{DICOM_XML}"; boundary={boundary}'


def search(level: Level) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The handler of one QIDO-RS resource at `level`."""

    async def handler(request: web.Request) -> web.Response:
        services = request.app[context.SERVICES]
        accept = request.headers.get("Accept")
        want_json = accepts(accept, DICOM_JSON, "application/json")
        if not want_json and not accepts_multipart(accept, DICOM_XML):
            raise NotAcceptable(
                'QIDO-RS answers application/dicom+json or multipart/related; '
                'type="application/dicom+xml"'
            )
        scope = {
            _SCOPE_KEYS[name]: value for name, value in request.match_info.items()
        }

        async def searched() -> SearchResult:  # a malformed query is audited as a failure
            query = parse_qido(level, request.query.items(), services.query.max_limit, scope)
            return await services.query.search(query, site_id=auth.site_id(request))

        result = await http_audit.searching(request, level, searched())
        base = context.base_url(request)
        for document in result.documents:
            url = _retrieve_url(base, level, document)
            if url:
                document["00081190"] = {"vr": "UR", "Value": [url]}
        headers = {}
        warning = _warning(_agent(base), result.ignored, result.more, result.more_at_least)
        if warning:
            headers["Warning"] = warning
        if result.next_cursor is not None:
            headers["Link"] = _next_link(request, base, result.next_cursor)
        if want_json:
            return web.Response(
                body=orjson.dumps(result.documents), content_type=DICOM_JSON, headers=headers
            )
        body, content_type = _multipart_xml(result.documents)
        headers["Content-Type"] = content_type
        return web.Response(body=body, headers=headers)

    return handler
