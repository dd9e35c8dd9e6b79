"""MD.ai's JSON export, read and written (pure: no I/O).

Read: `labelGroups[].labels[]` (id, name, scope `EXAM`/`STUDY`/`SERIES`/`INSTANCE`, type,
annotationMode, color, parentId) and `datasets[].annotations[]` (id, labelId, the three UIDs,
frameNumber 0-based, data, createdById, note, createdAt, updatedAt). Readers become keyed codes
here, so no MD.ai user id or e-mail address leaves this module; every other field (names,
e-mails, the dataset's own fields) is not read at all. Refusals name a position in the file
and a reason, never a value.

Written: the same shape, with the reader code as `createdById` and each label's `code` (an
extension MD.ai ignores), so that reading an export gives back exactly what was stored.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ricord_archive.deid import Keyring
from ricord_archive.dicom.uids import is_uid
from ricord_archive.labels.model import (
    Annotation,
    AnnotationMode,
    Code,
    Label,
    LabelGroup,
    LabelType,
    Scope,
)

READER_CODE = re.compile(r"R-[0-9A-F]{8}")
_COLOUR = re.compile(r"#[0-9a-fA-F]{6}")
_MAX_ID = 64
_SCOPES = {"EXAM": Scope.STUDY, "STUDY": Scope.STUDY, "SERIES": Scope.SERIES,
           "INSTANCE": Scope.INSTANCE}
_MDAI_SCOPE = {Scope.STUDY: "EXAM", Scope.SERIES: "SERIES", Scope.INSTANCE: "INSTANCE"}

# refusal reasons
NOT_AN_EXPORT = "not-an-export"
INVALID_LABEL = "invalid-label"
INVALID_GROUP = "invalid-group"
UNKNOWN_PARENT = "unknown-parent"
MISSING_ID = "missing-id"
DUPLICATE_ID = "duplicate-id"
UNKNOWN_LABEL = "unknown-label"
INVALID_UID = "invalid-uid"
MISSING_UID = "missing-uid"
INVALID_FRAME = "invalid-frame"
INVALID_GEOMETRY = "invalid-geometry"
MISSING_READER = "missing-reader"
INVALID_TIME = "invalid-time"


class ExportError(ValueError):
    """The document is not an MD.ai export at all (the message names no value)."""


@dataclass(frozen=True)
class Refusal:
    position: str  # e.g. "datasets[0].annotations[12]"
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"position": self.position, "reason": self.reason}


@dataclass(frozen=True)
class Located:
    """An annotation read from the file, with its position there."""

    position: str
    annotation: Annotation


@dataclass
class ParsedExport:
    groups: list[LabelGroup] = field(default_factory=list)
    labels: list[Label] = field(default_factory=list)
    annotations: list[Located] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)


def reader_code(keys: Keyring, identity: str) -> str:
    """`R-XXXXXXXX`: the keyed code of a reader (an MD.ai user id, else an e-mail address);
    the same reader always gets the same code. A reader code is kept as it is."""
    if READER_CODE.fullmatch(identity):
        return identity
    return "R-" + keys.digest("reader", identity).hex()[:8].upper()


def _text(value: Any, limit: int = _MAX_ID) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= limit else None


def _uid(value: Any) -> str | None:
    text = _text(value)
    return text if text is not None and is_uid(text) else None


def _time(value: Any) -> dt.datetime | None:
    """An ISO 8601 time (MD.ai's `2020-08-11T19:40:26.547Z`); ValueError when malformed."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("not a time")
    parsed = dt.datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _label(entry: Any, group_id: str, code_for: Callable[[str, str], Code]) -> Label | None:
    if not isinstance(entry, dict):
        return None
    label_id, name = _text(entry.get("id")), _text(entry.get("name"), 200)
    scope = _SCOPES.get(str(entry.get("scope", "")).upper())
    kind = str(entry.get("type", "")).lower()
    mode_text = entry.get("annotationMode")
    if label_id is None or name is None or scope is None or kind not in ("global", "local"):
        return None
    mode = None
    if mode_text is not None:
        if str(mode_text).lower() not in AnnotationMode.__members__.values():
            return None
        mode = AnnotationMode(str(mode_text).lower())
    if kind == "local" and mode is None:
        return None
    colour = entry.get("color")
    parent = entry.get("parentId")
    code = entry.get("code")
    if isinstance(code, dict) and all(_text(code.get(k), 200) for k in
                                      ("scheme", "value", "meaning")):
        coded = Code(code["scheme"], code["value"], code["meaning"])
    else:
        coded = code_for(label_id, name)
    return Label(
        label_id, name, group_id, scope, LabelType(kind), mode if kind == "local" else None,
        colour.lower() if isinstance(colour, str) and _COLOUR.fullmatch(colour) else None,
        _text(parent), coded,
    )


def _schema(document: dict, parsed: ParsedExport, known: Mapping[str, Label],
            code_for: Callable[[str, str], Code]) -> None:
    groups = document.get("labelGroups") or []
    if not isinstance(groups, list):
        raise ExportError("labelGroups is not a list")
    found: list[tuple[str, Label]] = []  # (position, label)
    seen: set[str] = set()
    for g, group in enumerate(groups):
        group_id = _text(group.get("id")) if isinstance(group, dict) else None
        name = _text(group.get("name"), 200) if isinstance(group, dict) else None
        if group_id is None or name is None or group_id in {x.id for x in parsed.groups}:
            parsed.refusals.append(Refusal(f"labelGroups[{g}]", INVALID_GROUP if group_id is None
                                           or name is None else DUPLICATE_ID))
            continue
        parsed.groups.append(LabelGroup(group_id, name))
        entries = group.get("labels") or []
        for n, entry in enumerate(entries if isinstance(entries, list) else []):
            label, at = _label(entry, group_id, code_for), f"labelGroups[{g}].labels[{n}]"
            if label is None:
                parsed.refusals.append(Refusal(at, INVALID_LABEL))
            elif label.id in seen:
                parsed.refusals.append(Refusal(at, DUPLICATE_ID))
            else:
                seen.add(label.id)
                found.append((at, label))
    orphans: set[str] = set()  # positions of labels whose parent is neither stored nor
    while True:                # in the file (nor itself such a label)
        ids = set(known) | {label.id for at, label in found if at not in orphans}
        more = {at for at, label in found if at not in orphans
                and label.parent_id is not None and label.parent_id not in ids}
        if not more:
            break
        orphans |= more
    parsed.labels += [label for at, label in found if at not in orphans]
    parsed.refusals += [Refusal(at, UNKNOWN_PARENT) for at, _ in found if at in orphans]


def _annotation(entry: Any, labels: Mapping[str, Label], keys: Keyring,
                keep_notes: bool) -> Annotation | str:
    """The annotation of an entry, or the reason it is refused."""
    if not isinstance(entry, dict) or _text(entry.get("id")) is None:
        return MISSING_ID
    label_id = entry.get("labelId")
    label = labels.get(label_id) if isinstance(label_id, str) else None
    if label is None:
        return UNKNOWN_LABEL
    uids = [entry.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
    checked = [_uid(u) for u in uids]
    if checked[0] is None or any(u is not None and c is None for u, c in zip(uids, checked,
                                                                             strict=True)):
        return INVALID_UID
    needed = {Scope.STUDY: 1, Scope.SERIES: 2, Scope.INSTANCE: 3}[label.scope]
    if any(c is None for c in checked[:needed]) or (checked[2] and not checked[1]):
        return MISSING_UID
    frame = entry.get("frameNumber")
    if frame is not None and (isinstance(frame, bool) or not isinstance(frame, int)
                              or frame < 0):
        return INVALID_FRAME
    geometry = entry.get("data")
    if not (geometry is None or isinstance(geometry, dict)) or (
            label.type is LabelType.LOCAL and not geometry):
        return INVALID_GEOMETRY
    identity = _text(entry.get("createdById"), 256) or _text(entry.get("createdByEmail"), 256)
    if identity is None:
        return MISSING_READER
    try:
        created, updated = _time(entry.get("createdAt")), _time(entry.get("updatedAt"))
    except ValueError:
        return INVALID_TIME
    note = entry.get("note")
    return Annotation(
        entry["id"], label.id, checked[0], checked[1], checked[2],
        None if frame is None else frame + 1,
        reader_code(keys, identity.strip().lower() if "@" in identity else identity),
        geometry, note if keep_notes and isinstance(note, str) and note else None,
        created, updated,
    )


def parse_export(
    document: Any, keys: Keyring, known: Mapping[str, Label],
    code_for: Callable[[str, str], Code], keep_notes: bool = False,
) -> ParsedExport:
    """Read an MD.ai export. `known`: the labels already stored, by id (annotations may name
    them); `code_for(id, name)`: the code of a label the file gives none for."""
    if not isinstance(document, dict) or not isinstance(document.get("datasets", []), list):
        raise ExportError("the document is not an MD.ai export (an object with datasets[] "
                          "and labelGroups[])")
    parsed = ParsedExport()
    _schema(document, parsed, known, code_for)
    labels = {**known, **{label.id: label for label in parsed.labels}}
    seen: set[str] = set()
    for d, dataset in enumerate(document.get("datasets", [])):
        entries = dataset.get("annotations") if isinstance(dataset, dict) else None
        if not isinstance(entries, list):
            parsed.refusals.append(Refusal(f"datasets[{d}]", NOT_AN_EXPORT))
            continue
        for n, entry in enumerate(entries):
            position = f"datasets[{d}].annotations[{n}]"
            result = _annotation(entry, labels, keys, keep_notes)
            if isinstance(result, str):
                parsed.refusals.append(Refusal(position, result))
            elif result.id in seen:
                parsed.refusals.append(Refusal(position, DUPLICATE_ID))
            else:
                seen.add(result.id)
                parsed.annotations.append(Located(position, result))
    return parsed


def _time_text(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.UTC).isoformat().replace(
        "+00:00", "Z")


def label_entry(label: Label) -> dict[str, Any]:
    return {
        "id": label.id, "name": label.name, "scope": _MDAI_SCOPE[label.scope],
        "type": label.type.value.upper(),
        "annotationMode": label.mode.value if label.mode else None,
        "color": label.colour, "parentId": label.parent_id,
        "code": {"scheme": label.code.scheme, "value": label.code.value,
                 "meaning": label.code.meaning},
    }


def annotation_entry(annotation: Annotation) -> dict[str, Any]:
    return {
        "id": annotation.id, "labelId": annotation.label_id,
        "StudyInstanceUID": annotation.study_uid,
        "SeriesInstanceUID": annotation.series_uid,
        "SOPInstanceUID": annotation.sop_uid,
        "frameNumber": None if annotation.frame is None else annotation.frame - 1,
        "data": annotation.geometry, "createdById": annotation.reader,
        "note": annotation.note,
        "createdAt": _time_text(annotation.created_at),
        "updatedAt": _time_text(annotation.updated_at),
    }


def to_export(groups: Iterable[LabelGroup], labels: Iterable[Label],
              annotations: Iterable[Annotation], name: str = "ricord-archive") -> dict[str, Any]:
    """MD.ai's export shape: every group with its labels, one dataset of the annotations."""
    by_group: dict[str, list[Label]] = {}
    for label in labels:
        by_group.setdefault(label.group_id, []).append(label)
    return {
        "name": name,
        "labelGroups": [{"id": g.id, "name": g.name,
                         "labels": [label_entry(lb) for lb in by_group.get(g.id, [])]}
                        for g in groups],
        "datasets": [{"id": "D_archive", "name": name,
                      "annotations": [annotation_entry(a) for a in annotations]}],
    }
