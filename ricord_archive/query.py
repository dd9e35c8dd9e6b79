"""The one query engine, for QIDO-RS and C-FIND alike."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from ricord_archive.index.reads import find_studies
from ricord_archive.matching import parse_study_query


@dataclass(frozen=True)
class StudySearch:
    documents: list[dict[str, Any]]  # DICOM JSON per study, aggregates included
    more: bool  # further matches exist past the page
    ignored_keys: tuple[str, ...]


class QueryService:
    def __init__(self, pool: asyncpg.Pool, max_limit: int) -> None:
        self.pool = pool
        self.max_limit = max_limit

    async def search_studies(
        self, params: Mapping[str, str], max_limit: int | None = None
    ) -> StudySearch:
        query = parse_study_query(params, max_limit or self.max_limit)
        rows, more = await find_studies(self.pool, query)
        documents = []
        for row in rows:
            document = orjson.loads(row.study_json)
            modalities = {"vr": "CS", "Value": sorted(row.modalities)} if row.modalities else {
                "vr": "CS"
            }
            document["00080061"] = modalities
            document["00201206"] = {"vr": "IS", "Value": [row.num_series]}
            document["00201208"] = {"vr": "IS", "Value": [row.num_instances]}
            document["00080056"] = {"vr": "CS", "Value": ["ONLINE"]}
            documents.append(dict(sorted(document.items())))
        return StudySearch(documents, more, query.ignored_keys)
