"""Readers' agreement on an examination's global labels (RICORD's three-reader radiographs)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def consensus(choices: Iterable[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """One item per examination from `(StudyInstanceUID, reader, label name)` choices:
    each reader's labels, the majority (labels chosen by more than half of the readers who
    labelled the examination) and whether every reader chose the same labels."""
    studies: dict[str, dict[str, set[str]]] = {}
    for study_uid, reader, name in choices:
        studies.setdefault(study_uid, {}).setdefault(reader, set()).add(name)
    items = []
    for study_uid in sorted(studies):
        readers = studies[study_uid]
        names = {name for chosen in readers.values() for name in chosen}
        majority = sorted(n for n in names
                          if 2 * sum(n in chosen for chosen in readers.values()) > len(readers))
        items.append({
            "StudyInstanceUID": study_uid,
            "readers": {reader: sorted(readers[reader]) for reader in sorted(readers)},
            "majority": majority,
            "agreed": all(chosen == names for chosen in readers.values()),
        })
    return items
