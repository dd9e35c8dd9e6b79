"""The C-FIND parser: a request identifier as a `Query`. Pure.

Each element of the identifier is a matching key with its value as DICOM encodes it (values of a
multi-valued element joined by backslashes); a sequence key matches on the elements of its first
item, as dotted keyword paths. Every element is also a key to return (PS3.4 C.2.2.1).
"""

from __future__ import annotations

from collections.abc import Iterator

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from ricord_archive.search.model import Level, Query, QueryKeys

_NOT_KEYS = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet", "TimezoneOffsetFromUTC"})


def identifier_keys(identifier: Dataset, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(keyword path, value) of each key of a C-FIND identifier."""
    for element in identifier:
        if element.keyword in _NOT_KEYS or not element.keyword:
            continue
        path = f"{prefix}{element.keyword}"
        if element.VR == "SQ":
            items = element.value or []
            if items:
                yield from identifier_keys(items[0], f"{path}.")
            else:
                yield path, ""
        else:
            yield path, _value_text(element.value)


def _value_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list):
        return "\\".join(str(v) for v in value)
    return str(value)


def parse_identifier(level: Level, identifier: Dataset, max_limit: int) -> Query:
    """The query of a C-FIND at `level` (from QueryRetrieveLevel): at most `max_limit`
    matches; an IMAGE-level answer holds every requested attribute the instance has."""
    keys = QueryKeys(level)
    for path, value in identifier_keys(identifier):
        keys.add(path, value)
    returned = frozenset(f"{element.tag:08X}" for element in identifier
                         if element.keyword and element.keyword not in _NOT_KEYS)
    return Query(level, keys.terms(), returned=returned, limit=max_limit,
                 ignored=tuple(keys.ignored))
