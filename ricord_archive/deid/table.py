"""PS3.15 Table E.1-1 loaded as data, resolved for the options the archive applies.

The table ships with the package (`data/ps3.15_table_E.1-1.json`, MIT licence beside it, from the
innolitics/dicom-standard project). Rows for repeating or private groups (50xx, 60xx, odd groups)
are handled by group rules in the engine, which removes those groups whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from functools import cache
from importlib import resources


class Option(Enum):
    """PS3.15 options, by their code in CID 7050 and their column in the table."""

    BASIC = ("113100", "basicProfile", "Basic Application Confidentiality Profile")
    MODIFIED_DATES = (
        "113107", "rtnLongModifDatesOpt",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    )
    PATIENT_CHARACTERISTICS = ("113108", "rtnPatCharsOpt", "Retain Patient Characteristics Option")
    DEVICE_IDENTITY = ("113109", "rtnDevIdOpt", "Retain Device Identity Option")

    @property
    def code(self) -> str:
        return self.value[0]

    @property
    def column(self) -> str:
        return self.value[1]

    @property
    def meaning(self) -> str:
        return self.value[2]


# Options whose table column drives the actions.
APPLIED_OPTIONS = (Option.BASIC, Option.MODIFIED_DATES, Option.PATIENT_CHARACTERISTICS)
# Options declared in DeidentificationMethodCodeSequence. Retain Device Identity is applied in
# the limited form RICORD uses: only Manufacturer and ManufacturerModelName are kept (the
# table's other device attributes, serial numbers and station names among them, are not).
DECLARED_OPTIONS = (*APPLIED_OPTIONS, Option.DEVICE_IDENTITY)


@dataclass(frozen=True)
class ProfileTable:
    """Tag (as an int) -> action code ('X', 'Z', 'D', 'U', 'K', 'C' or a compound like 'X/Z')."""

    actions: dict[int, str]
    names: dict[int, str]


def _raw_rows() -> list[dict[str, str]]:
    text = resources.files("ricord_archive.deid").joinpath("data/ps3.15_table_E.1-1.json")
    return json.loads(text.read_text(encoding="utf-8"))


@cache
def profile_table(options: tuple[Option, ...] = APPLIED_OPTIONS) -> ProfileTable:
    """The table's action per tag, an option's column overriding the basic profile."""
    actions: dict[int, str] = {}
    names: dict[int, str] = {}
    for row in _raw_rows():
        tag_id = row["id"]
        if len(tag_id) != 8 or not all(c in "0123456789abcdef" for c in tag_id):
            continue  # repeating-group and private-group rows: engine group rules
        action = row["basicProfile"]
        for option in options:
            if option is not Option.BASIC and row.get(option.column):
                action = row[option.column]
        tag = int(tag_id, 16)
        actions[tag] = action
        names[tag] = " ".join(row["name"].split()).split(" (see")[0]
    return ProfileTable(actions, names)
