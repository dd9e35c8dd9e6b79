"""The QIDO-RS parser: a search's query parameters and resource path as a `Query`. Pure.

Keys are DICOM keywords or tags (dotted for sequence keys); `limit`, `offset`,
`includefield` and `fuzzymatching` steer the search (PS3.18 8.3.4), and `cursor`, the opaque
token of a `Link: rel="next"` header, continues a search where its last page ended (keyset).
A parameter that is no DICOM attribute is ignored and reported (PS3.18: an origin server
ignores what it does not support); malformed values, of keys and of control parameters,
raise BadRequest.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from ricord_archive.errors import BadRequest
from ricord_archive.search import cursor
from ricord_archive.search.model import (
    CONTROL_PARAMETERS,
    Level,
    Query,
    QueryKeys,
    Scope,
    attribute_path,
    scope_uids,
)


def _include(values: Iterable[str]) -> frozenset[str] | None:
    tags = set()
    for raw in values:
        for item in raw.split(","):
            item = item.strip()
            if item == "all":
                return None
            path = attribute_path(item) if item else None
            if path is None:
                raise BadRequest(f"includefield: {item[:64]!r} is not a DICOM keyword or tag")
            tags.add(path[1])
    return frozenset(tags)


def _non_negative(name: str, raw: str | None, default: int) -> int:
    if raw is None or raw == "":
        return default
    if not re.fullmatch(r"[0-9]{1,9}", raw):
        raise BadRequest(f"{name} must be a non-negative integer")
    return int(raw)


def _scope(names: Mapping[str, str]) -> Scope:
    """The resource path's UIDs, keyed by StudyInstanceUID and SeriesInstanceUID."""
    study = names.get("StudyInstanceUID")
    series = names.get("SeriesInstanceUID")
    return Scope(
        scope_uids("StudyInstanceUID", study) if study is not None else (),
        scope_uids("SeriesInstanceUID", series) if series is not None else (),
    )


def parse_qido(
    level: Level,
    params: Iterable[tuple[str, str]],
    max_limit: int,
    scope: Mapping[str, str] | None = None,
) -> Query:
    """The query of a search at `level`: its (name, value) parameters in request order and
    `scope`, the UIDs of its resource path (e.g. the study of /studies/{uid}/series)."""
    pairs = list(params)
    control = {k: v for k, v in pairs if k in CONTROL_PARAMETERS and k != "includefield"}
    fuzzy = control.get("fuzzymatching", "false").lower() == "true"
    keys = QueryKeys(level, fuzzy)
    for name, value in pairs:
        if name in CONTROL_PARAMETERS:
            continue
        path = attribute_path(name)
        if path is None:
            keys.ignore(f"{name[:64]!r} is not a query parameter of this archive")
        else:
            keys.add(path[0], value)
    parent = _scope(scope or {})
    terms = keys.terms()
    limit = _non_negative("limit", control.get("limit"), max_limit)
    offset = _non_negative("offset", control.get("offset"), 0)
    token = control.get("cursor")
    if token is not None and control.get("offset") is not None:
        raise BadRequest("offset and cursor exclude each other: follow the Link header's URL")
    return Query(
        level=level,
        terms=terms,
        scope=parent,
        returned=_include(v for k, v in pairs if k == "includefield"),
        limit=min(limit, max_limit) if limit else max_limit,
        offset=offset,
        after=cursor.decode(token, level) if token is not None else None,
        fuzzy=fuzzy,
        ignored=tuple(keys.ignored),
    )
