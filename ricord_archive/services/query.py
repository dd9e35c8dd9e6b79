"""The one query engine, for QIDO-RS and C-FIND alike: a `Query` in, DICOM JSON out."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import orjson

from ricord_archive.dicom.json import INSTANCE_TAGS
from ricord_archive.index.database import reporting_outages
from ricord_archive.index.facade import Index
from ricord_archive.index.search import COUNT_CAP, Found
from ricord_archive.search import cursor
from ricord_archive.search.model import Level, Query

PATIENT_TAGS = frozenset({
    "00080005", "00100010", "00100020", "00100030", "00100040", "00120030", "00120040",
    "00120062", "00120063", "00280303",
})


@dataclass(frozen=True)
class SearchResult:
    documents: list[dict[str, Any]]  # DICOM JSON per match, aggregates included
    more: int  # further matches past the page
    more_at_least: bool  # `more` is a lower bound: counting stopped there
    ignored: tuple[str, ...]  # notes on query keys the archive did not match on
    next_cursor: str | None = None  # the opaque token of the next page when `more`


def _value(vr: str, *values: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)} if values else {"vr": vr}


def _pick(document: dict[str, Any], tags: Iterable[str]) -> dict[str, Any]:
    return {tag: document[tag] for tag in tags if tag in document}


def _included(query: Query, document: dict[str, Any], defaults: frozenset[str]) -> dict:
    if query.returned is None:
        return document
    wanted = defaults | {path.split(".")[0] for path in query.returned}
    return _pick(document, wanted)


def _patient(row: Found) -> dict[str, Any]:
    document = _pick(orjson.loads(row.study_json), PATIENT_TAGS) if row.study_json else {}
    document["00201200"] = _value("IS", row.num_studies)
    document["00201202"] = _value("IS", row.num_series)
    document["00201204"] = _value("IS", row.num_instances)
    return document


def _study(row: Found) -> dict[str, Any]:
    document = orjson.loads(row.study_json or "{}")
    document["00080061"] = _value("CS", *sorted(row.modalities))
    document["00201206"] = _value("IS", row.num_series)
    document["00201208"] = _value("IS", row.num_instances)
    document["00080056"] = _value("CS", "ONLINE")
    return document


def _parsed(cache: dict[str, dict], raw: str | None) -> dict[str, Any]:
    """A stored document parsed once per answer (many rows share their study and series)."""
    raw = raw or "{}"
    if raw not in cache:
        cache[raw] = orjson.loads(raw)
    return dict(cache[raw])


def _series(row: Found, cache: dict[str, dict]) -> dict[str, Any]:
    document = _parsed(cache, row.study_json)
    document.update(_parsed(cache, row.series_json))
    document["00201209"] = _value("IS", row.num_instances)
    document["00080056"] = _value("CS", "ONLINE")
    return document


def _instance(row: Found, query: Query, cache: dict[str, dict]) -> dict[str, Any]:
    document = _parsed(cache, row.study_json)
    document.update(_parsed(cache, row.series_json))
    document.update(_included(query, orjson.loads(row.instance_json or "{}"), INSTANCE_TAGS))
    document["00080056"] = _value("CS", "ONLINE")
    return document


class QueryService:
    """Searches go to the index's read replica, when one is configured, unless `fresh`."""

    def __init__(self, index: Index, max_limit: int) -> None:
        self.index = index
        self.max_limit = max_limit

    async def search(
        self, query: Query, site_id: int | None = None, fresh: bool = False,
    ) -> SearchResult:
        """Matches of the query; only one site's when `site_id` (an index site id) is given.
        `fresh`: asked of the primary, never of a read replica that may lag behind (for
        retrieves, whose bytes are looked up on the primary)."""
        if site_id is not None:
            query = replace(query, site_id=site_id)
        level = query.level
        async with reporting_outages():
            page = await self.index.search(query, fresh)
        cache: dict[str, dict] = {}
        if level is Level.INSTANCE:
            documents = [_instance(row, query, cache) for row in page.rows]
        elif level is Level.SERIES:
            documents = [_series(row, cache) for row in page.rows]
        else:
            build = _patient if level is Level.PATIENT else _study
            documents = [build(row) for row in page.rows]
        return SearchResult(
            [dict(sorted(d.items())) for d in documents], page.more, page.more >= COUNT_CAP,
            query.ignored,
            cursor.encode(level, page.last_key) if page.last_key is not None else None,
        )
