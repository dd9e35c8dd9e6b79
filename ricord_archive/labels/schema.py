"""Labelling schemas shipped with the package as data (`labels/data/<name>.toml`): RICORD's."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources

from ricord_archive.labels.model import AnnotationMode, Code, Label, LabelGroup, LabelType, Scope

PRIVATE_SCHEME = "99RICORD"
SHIPPED = ("ricord",)


class SchemaError(ValueError):
    """A schema that cannot be loaded: unknown name, or a malformed entry."""


@dataclass(frozen=True)
class Schema:
    groups: list[LabelGroup]
    labels: list[Label]

    def code_named(self, name: str) -> Code | None:
        """The code of the schema's label of that name (case-insensitive), if any."""
        wanted = name.casefold()
        return next((lb.code for lb in self.labels if lb.name.casefold() == wanted), None)


def parse_schema(text: str) -> Schema:
    """A schema from its TOML text: `[[groups]]` with id, name and `labels`."""
    try:
        document = tomllib.loads(text)
        groups, labels = [], []
        for group in document["groups"]:
            groups.append(LabelGroup(group["id"], group["name"]))
            for entry in group["labels"]:
                scheme, value, meaning = entry["code"]
                labels.append(Label(
                    entry["id"], entry["name"], group["id"], Scope(entry["scope"]),
                    LabelType(entry["type"]),
                    AnnotationMode(entry["mode"]) if entry.get("mode") else None,
                    entry.get("colour"), entry.get("parent"), Code(scheme, value, meaning),
                ))
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
        raise SchemaError(f"malformed labelling schema: {exc}") from None
    return Schema(groups, labels)


def shipped_schema(name: str) -> Schema:
    """A schema shipped with the package, by name (`ricord`)."""
    if name not in SHIPPED:
        raise SchemaError(f"no shipped labelling schema {name!r}; known: {', '.join(SHIPPED)}")
    data = resources.files("ricord_archive.labels").joinpath(f"data/{name}.toml")
    return parse_schema(data.read_text(encoding="utf-8"))


def private_code(label_id: str, name: str) -> Code:
    """The code of a label no schema codes: the private scheme, its id as the value."""
    return Code(PRIVATE_SCHEME, label_id, name)
