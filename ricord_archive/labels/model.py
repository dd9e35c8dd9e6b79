"""Domain types of labels and annotations, shared by storage, MD.ai exchange and DICOM output.

Everything here is already de-identified: UIDs are the archive's own, readers are keyed codes
(``R-XXXXXXXX``), never MD.ai user ids or e-mail addresses.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Scope(StrEnum):
    """What a label applies to; MD.ai's ``EXAM`` is read as ``STUDY``."""

    STUDY = "STUDY"
    SERIES = "SERIES"
    INSTANCE = "INSTANCE"


class LabelType(StrEnum):
    GLOBAL = "global"
    LOCAL = "local"


class AnnotationMode(StrEnum):
    BBOX = "bbox"
    POLYGON = "polygon"
    FREEFORM = "freeform"
    LINE = "line"
    LOCATION = "location"
    MASK = "mask"


@dataclass(frozen=True, slots=True)
class Code:
    """A coded concept: SNOMED CT where one exists, the private ``99RICORD`` scheme otherwise."""

    scheme: str
    value: str
    meaning: str


@dataclass(frozen=True, slots=True)
class LabelGroup:
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class Label:
    id: str
    name: str
    group_id: str
    scope: Scope
    type: LabelType
    mode: AnnotationMode | None  # None for global labels
    colour: str | None  # "#rrggbb"
    parent_id: str | None
    code: Code


@dataclass(frozen=True, slots=True)
class Annotation:
    """One reader's label on an examination, a series, or a frame of an instance.

    ``geometry`` is MD.ai's ``data`` as given: ``{x,y,width,height}``, ``{vertices:[[x,y],...]}``,
    ``{foreground:[...],background:[...]}``, or ``None`` for a global label. ``frame`` is
    1-based, ``None`` when the annotation is not on a frame. ``created_at`` / ``updated_at``
    are MD.ai's ``createdAt`` / ``updatedAt`` when it gave them.
    """

    id: str
    label_id: str
    study_uid: str
    series_uid: str | None
    sop_uid: str | None
    frame: int | None
    reader: str
    geometry: dict[str, Any] | None
    note: str | None
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None
