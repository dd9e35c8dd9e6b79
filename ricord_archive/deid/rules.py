"""The de-identification rules, decided per element: one table consulted by both walkers.

`Rules` says, for an element's tag and value representation, whether it is kept as encoded,
removed, set to a new value, or rewritten value by value (UIDs remapped, dates shifted, ages
capped). `inserted` lists the attributes the archive then sets. The pydicom engine
(`engine.py`) and the byte walker (`walker.py`) only apply these decisions to their own
representation of the object; neither holds a rule of its own.

Rules, in order, for every element at every depth:
1. private (odd) groups, curves (50xx), overlays (60xx) and file-meta-like group 0002: removed;
2. attributes PS3.15 Table E.1-1 names: its action, resolved for the applied options;
3. anything else, by value representation: UIDs remapped (registry UIDs kept), dates shifted,
   names, free text, AE titles, URIs and unknown (UN) values removed; numbers and codes kept;
   ages over 89 years capped at 090Y.
Sequences the table empties ('Z') and code sequences that identify a person or an institution
are emptied; other sequences that are not removed are kept and cleaned item by item with the
same rules.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from pydicom.datadict import dictionary_VR

from ricord_archive import __version__
from ricord_archive.deid.keys import Keyring
from ricord_archive.deid.table import DECLARED_OPTIONS, profile_table
from ricord_archive.dicom.json import read_date

REGISTRY_UID_ROOT = "1.2.840.10008."
PRIVATE_GROUP, PRIVATE_CREATOR = 0x0013, "RSNA"  # (0013,1001) project name, (0013,1003) SITEID

# UI attributes that name a class or a registry entry, never an instance: kept whatever the root.
# Not ContextGroupExtensionCreatorUID: it names the organization that extended a context group
# and is remapped, like the Template Extension Creator UID PS3.15 remaps.
_CLASS_UID_TAGS = frozenset({
    0x00020002,  # MediaStorageSOPClassUID
    0x00020010,  # TransferSyntaxUID
    0x00080016,  # SOPClassUID
    0x00081150,  # ReferencedSOPClassUID
    0x0008001A,  # RelatedGeneralSOPClassUID
    0x0008001B,  # OriginalSpecializedSOPClassUID
    0x00041510,  # ReferencedSOPClassUIDInFile
    0x00041512,  # ReferencedTransferSyntaxUIDInFile
    0x0004151A,  # ReferencedRelatedGeneralSOPClassUIDInFile
    0x0008010C,  # CodingSchemeUID
    0x00080117,  # ContextUID
    0x00000002,  # AffectedSOPClassUID
    0x00000003,  # RequestedSOPClassUID
})

# Text attributes the table does not name that carry no personal information: coded entries
# (CodeValue, CodingSchemeDesignator, CodingSchemeVersion, CodeMeaning, LongCodeValue,
# URNCodeValue, MappingResource) and the device make and model (Retain Device Identity,
# limited to Manufacturer and ManufacturerModelName).
_SAFE_TEXT_TAGS = frozenset({
    0x00080100, 0x00080102, 0x00080103, 0x00080104, 0x00080119, 0x00080120, 0x00080105,
    0x00080070, 0x00081090,
})

# Code sequences whose codes name a person or an institution (a staff number, "Dr Smith",
# "General Hospital"): the coded-entry exception above must not keep them, so they are emptied.
_IDENTIFYING_CODE_SEQUENCES = frozenset({
    0x00080082,  # InstitutionCodeSequence
    0x00401101,  # PersonIdentificationCodeSequence
    0x0040A088,  # VerifyingObserverIdentificationCodeSequence
    0x0040003A,  # AssigningAgencyOrDepartmentCodeSequence (of the patient ID's issuer)
    0x00400039,  # AssigningJurisdictionCodeSequence (of the patient ID's issuer)
})

_REMOVED_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC", "AE", "UR", "UN"})
_DUMMY = {
    "PN": "ANONYMIZED", "LO": "ANONYMIZED", "SH": "ANONYMIZED", "CS": "ANONYMIZED",
    "ST": "ANONYMIZED", "LT": "ANONYMIZED", "UT": "ANONYMIZED", "UC": "ANONYMIZED",
    "DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000Y",
    "IS": "0", "DS": "0",
}
_AGE = re.compile(r"^(\d{3})([DWMY])$")

PATIENT_NAME = 0x00100010
PATIENT_ID = 0x00100020
PATIENT_AGE = 0x00101010
PATIENT_BIRTH_DATE = 0x00100030
ACCESSION_NUMBER = 0x00080050
STUDY_ID = 0x00200010
STUDY_INSTANCE_UID = 0x0020000D
STUDY_DATE = 0x00080020
METHOD_CODE_SEQUENCE = 0x00120064


class DeidentificationError(ValueError):
    """The object cannot be de-identified safely (e.g. it has no PatientID)."""


@dataclass(frozen=True)
class DeidContext:
    """What de-identifying one object needs from outside: the site, the patient's pseudonym
    and date offset (allocated by the index), and the keys."""

    siteid: str
    pseudonym: str
    date_offset_days: int
    keys: Keyring
    project_name: str = "RICORD"


def shift_date(value: str, days: int) -> str:
    """Shift a DA value by `days`; '' for anything that is not a full valid date."""
    try:
        moved = read_date(value.strip()) + dt.timedelta(days=days)
    except (ValueError, OverflowError):  # OverflowError: shifted before year 1 or after 9999
        return ""
    return moved.strftime("%Y%m%d")


def shift_datetime(value: str, days: int) -> str:
    """Shift the date part of a DT value, keeping the time of day; '' if the date is partial."""
    text = value.strip()
    date_part = shift_date(text[:8], days) if len(text) >= 8 else ""
    return date_part + text[8:] if date_part else ""


def keyed_uid(keys: Keyring, siteid: str, value: str) -> str:
    """The UID the archive gives an original UID at a site (registry UIDs kept)."""
    value = value.strip().rstrip("\x00")
    if not value or value.startswith(REGISTRY_UID_ROOT):
        return value
    return keys.uid(siteid, value)


def keyed_accession(keys: Keyring, siteid: str, accession: str) -> str:
    """The AccessionNumber the archive gives an original (stripped, non-empty) one at a site."""
    return keys.short_code("accession", siteid, accession)


def cap_age(value: str) -> str:
    """Ages over 89 years become 090Y (HIPAA safe harbour); malformed ages are dropped.

    Applied to every AS value kept, including those the table keeps ('K', Patient's Age under
    the Retain Patient Characteristics Option)."""
    match = _AGE.match(value.strip())
    if not match:
        return ""
    number, unit = int(match.group(1)), match.group(2)
    return "090Y" if unit == "Y" and number > 89 else value.strip()


def age_from(birth: str, study_date: str) -> str:
    try:
        born, seen = read_date(birth), read_date(study_date)
    except ValueError:
        return ""
    years = seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))
    if years < 0:
        return ""
    return cap_age(f"{years:03d}Y")


@lru_cache(maxsize=16384)
def _settled(tag: int, vr: str) -> bool | None:
    """`Rules.settled`: it depends on the tag, the VR and the (fixed) table only."""
    group = tag >> 16
    if group % 2 == 1 or group == 0x0002 or group >> 8 in (0x50, 0x60):
        return False
    action = profile_table().actions.get(tag)
    if vr == "SQ":
        return False if action == "X" else None
    if action == "X":
        return False
    if action == "K":
        return None if vr == "AS" else True
    if action is not None:
        return None
    if vr == "UI":
        return True if tag in _CLASS_UID_TAGS else None
    if vr in ("DA", "DT", "AS"):
        return None
    if vr in _REMOVED_VRS:
        return tag in _SAFE_TEXT_TAGS
    return True


@lru_cache(maxsize=8192)
def decision_vr(encoded_vr: str | None, tag: int) -> str:
    """The VR to decide by: as encoded, else (implicit VR, or UN for a known attribute, which
    pydicom corrects on decoding) from the data dictionary; unknown attributes are UN."""
    if encoded_vr and encoded_vr != "UN":
        return encoded_vr
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


@dataclass(frozen=True, slots=True)
class SetValue:
    """Replace the value by `value` (None: an empty value)."""

    value: str | None


@dataclass(frozen=True, slots=True)
class MapValues:
    """Rewrite each value of a non-empty text value with `fn`."""

    fn: Callable[[str], str]


# What to do with one element: True keep as it is, False remove, or a rewrite.
Edit = bool | SetValue | MapValues
EMPTIED, CLEANED = "emptied", "cleaned"  # what happens to a sequence that is not removed


class Rules:
    """The decisions for one object, given its de-identification context."""

    def __init__(self, context: DeidContext) -> None:
        self.context = context
        self.actions = profile_table().actions
        offset = context.date_offset_days
        self._remap = MapValues(self.remap_uid)
        self._by_vr_edits: dict[str, Edit] = {
            "DA": MapValues(lambda v: shift_date(v, offset)),
            "DT": MapValues(lambda v: shift_datetime(v, offset)),
            "AS": MapValues(cap_age),
        }

    def remap_uid(self, value: str) -> str:
        return keyed_uid(self.context.keys, self.context.siteid, value)

    @staticmethod
    def settled(tag: int, vr: str) -> bool | None:
        """Decide from tag and VR alone: True keep untouched, False remove, None rewrite
        (`sequence` for SQ, else `edit`). Elements kept untouched are written back byte for
        byte, never decoded."""
        return _settled(tag, vr)

    def sequence(self, tag: int) -> str | None:
        """A sequence's fate: None removed, EMPTIED, or CLEANED item by item."""
        action = self.actions.get(tag)
        if action == "X":
            return None
        if action == "Z" or tag in _IDENTIFYING_CODE_SEQUENCES:
            return EMPTIED
        return CLEANED

    def _by_vr(self, tag: int, vr: str) -> Edit:
        if vr == "UI":
            return True if tag in _CLASS_UID_TAGS else self._remap
        edit = self._by_vr_edits.get(vr)
        if edit is not None:
            return edit
        if vr in _REMOVED_VRS:
            return tag in _SAFE_TEXT_TAGS
        return True

    def edit(self, tag: int, vr: str) -> Edit:
        """What to do with an element (not a sequence) that `settled` left open."""
        action = self.actions.get(tag)
        if action is None:
            return self._by_vr(tag, vr)
        if action == "K":
            return vr != "AS" or self._by_vr(tag, vr)
        if action == "X":
            return False
        if action == "U":
            return self._remap
        if action == "C":  # dates shifted, times kept, age capped; free text cannot be cleaned
            return self._by_vr(tag, vr) if vr in ("DA", "DT", "TM", "AS") else False
        if vr == "UI":  # U* compounds and any UID the table empties: remap instead
            return self._remap
        if "Z" in action:
            return SetValue(None)
        if "D" in action:
            return SetValue(_DUMMY.get(vr))
        return False


@dataclass(frozen=True)
class Originals:
    """Values of the original object the inserted attributes derive from (stripped text)."""

    study_uid: str
    accession: str
    age: str
    birth: str
    study_date: str


@dataclass(frozen=True)
class Inserted:
    """An attribute the archive sets after cleaning: `value` is text, None (empty) or, for a
    sequence, its items as tuples of Inserted. `only_if_present`: set only if it is there."""

    tag: int
    vr: str
    value: str | tuple[tuple[Inserted, ...], ...] | None
    only_if_present: bool = False


_METHOD_CODES = tuple(
    (Inserted(0x00080100, "SH", option.code), Inserted(0x00080102, "SH", "DCM"),
     Inserted(0x00080104, "LO", option.meaning))
    for option in DECLARED_OPTIONS
)


def inserted(context: DeidContext, originals: Originals) -> list[Inserted]:
    """The pseudonyms and de-identification attributes, in tag order."""
    keys, siteid = context.keys, context.siteid
    out = [
        Inserted(ACCESSION_NUMBER, "SH", keyed_accession(keys, siteid, originals.accession)
                 if originals.accession else None),
        Inserted(PATIENT_NAME, "PN", context.pseudonym),
        Inserted(PATIENT_ID, "LO", context.pseudonym),
        Inserted(PATIENT_BIRTH_DATE, "DA", None, only_if_present=True),
    ]
    if not originals.age and originals.birth and originals.study_date:
        derived = age_from(originals.birth, originals.study_date)
        if derived:
            out.append(Inserted(PATIENT_AGE, "AS", derived))
    out += [
        Inserted(0x00120030, "LO", siteid),  # ClinicalTrialSiteID
        Inserted(0x00120040, "LO", context.pseudonym),  # ClinicalTrialSubjectID
        Inserted(0x00120062, "CS", "YES"),  # PatientIdentityRemoved
        Inserted(0x00120063, "LO", f"ricord-archive {__version__} PS3.15 E.1-1"),
        Inserted(METHOD_CODE_SEQUENCE, "SQ", _METHOD_CODES),
        # Provenance where RICORD tooling (the RSNA Anonymizer) looks for it: every odd group
        # is removed first, so the block's creator takes the first slot, (0013,0010).
        Inserted(PRIVATE_GROUP << 16 | 0x0010, "LO", PRIVATE_CREATOR),
        Inserted(PRIVATE_GROUP << 16 | 0x1001, "SH", context.project_name[:16]),
        Inserted(PRIVATE_GROUP << 16 | 0x1003, "SH", siteid),
    ]
    if originals.study_uid:
        out.append(Inserted(STUDY_ID, "SH", keys.short_code("study-id", siteid,
                                                            originals.study_uid)))
    out.append(Inserted(0x00280303, "CS", "MODIFIED"))  # LongitudinalTemporalInformationModified
    return sorted(out, key=lambda item: item.tag)
