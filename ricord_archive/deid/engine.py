"""The de-identification engine: `deidentify(dataset, context)` rewrites a parsed dataset.

Rules, in order, for every element at every depth:
1. private (odd) groups, curves (50xx), overlays (60xx) and file-meta-like group 0002: removed;
2. attributes PS3.15 Table E.1-1 names: its action, resolved for the applied options;
3. anything else, by value representation: UIDs remapped (registry UIDs kept), dates shifted,
   names, free text, AE titles, URIs and unknown (UN) values removed; numbers and codes kept;
   ages over 89 years capped at 090Y.
Sequences the table empties ('Z') and code sequences that identify a person or an institution
are emptied; other sequences that are not removed are kept and cleaned item by item with the
same rules.
Then the archive's pseudonyms and the de-identification attributes are inserted.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from ricord_archive import __version__
from ricord_archive.deid.keys import Keyring
from ricord_archive.deid.table import DECLARED_OPTIONS, profile_table

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


def patient_id_of(dataset: Dataset) -> str:
    """The original PatientID, required: objects without one are refused, never merged."""
    value = dataset.get("PatientID")
    text = str(value).strip() if value is not None else ""
    if not text:
        raise DeidentificationError("the object has no PatientID (0010,0020)")
    return text


def shift_date(value: str, days: int) -> str:
    """Shift a DA value by `days`; '' for anything that is not a full valid date."""
    text = value.strip()
    try:
        moved = dt.datetime.strptime(text, "%Y%m%d").date() + dt.timedelta(days=days)
    except (ValueError, OverflowError):  # OverflowError: shifted before year 1 or after 9999
        return ""
    return moved.strftime("%Y%m%d")


def shift_datetime(value: str, days: int) -> str:
    """Shift the date part of a DT value, keeping the time of day; '' if the date is partial."""
    text = value.strip()
    date_part = shift_date(text[:8], days) if len(text) >= 8 else ""
    return date_part + text[8:] if date_part else ""


def cap_age(value: str) -> str:
    """Ages over 89 years become 090Y (HIPAA safe harbour); malformed ages are dropped.

    Applied to every AS value kept, including those the table keeps ('K', Patient's Age under
    the Retain Patient Characteristics Option)."""
    match = _AGE.match(value.strip())
    if not match:
        return ""
    number, unit = int(match.group(1)), match.group(2)
    return "090Y" if unit == "Y" and number > 89 else value.strip()


class _Cleaner:
    def __init__(self, context: DeidContext) -> None:
        self.context = context
        self.actions = profile_table().actions

    def remap_uid(self, value: str) -> str:
        value = value.strip().rstrip("\x00")
        if not value or value.startswith(REGISTRY_UID_ROOT):
            return value
        return self.context.keys.uid(self.context.siteid, value)

    def _map_values(self, element: DataElement, fn) -> None:
        value = element.value
        if value is None or value == "":
            return
        if isinstance(value, MultiValue | list):
            element.value = [fn(str(v)) for v in value]
        else:
            element.value = fn(str(value))

    @staticmethod
    def _dummy(element: DataElement) -> None:
        element.value = _DUMMY.get(element.VR)

    def _by_vr(self, element: DataElement) -> bool:
        """Apply the VR rule; return False when the element must be removed."""
        vr = element.VR
        if vr == "UI":
            if element.tag not in _CLASS_UID_TAGS:
                self._map_values(element, self.remap_uid)
            return True
        if vr == "DA":
            self._map_values(element, lambda v: shift_date(v, self.context.date_offset_days))
            return True
        if vr == "DT":
            self._map_values(element, lambda v: shift_datetime(v, self.context.date_offset_days))
            return True
        if vr == "AS":
            self._map_values(element, cap_age)
            return True
        if vr in _REMOVED_VRS:
            return element.tag in _SAFE_TEXT_TAGS
        return True

    def _clean(self, element: DataElement) -> bool:
        """Apply the table's 'C' action: dates shifted, times kept, age capped, else removed."""
        if element.VR in ("DA", "DT", "TM", "AS"):
            return self._by_vr(element)
        return False  # free text cannot be cleaned reliably: removed

    def element(self, element: DataElement) -> bool:
        """Rewrite one element in place; return False when it must be removed."""
        tag = element.tag
        group = tag >> 16
        if group % 2 == 1 or group == 0x0002 or group >> 8 in (0x50, 0x60):
            return False
        action = self.actions.get(int(tag))
        if element.VR == "SQ":
            if action == "X":
                return False
            if action == "Z" or tag in _IDENTIFYING_CODE_SEQUENCES:
                element.value = Sequence()
                return True
            for item in element.value or ():
                self.dataset(item)
            return True
        if action is None:
            return self._by_vr(element)
        if action == "K":
            return element.VR != "AS" or self._by_vr(element)
        if action == "X":
            return False
        if action == "U":
            self._map_values(element, self.remap_uid)
            return True
        if action == "C":
            return self._clean(element)
        if element.VR == "UI":  # U* compounds and any UID the table empties: remap instead
            self._map_values(element, self.remap_uid)
            return True
        if "Z" in action:
            element.value = None
            return True
        if "D" in action:
            self._dummy(element)
            return True
        return False

    def _settled(self, tag: int, vr: str) -> bool | None:
        """Decide from tag and VR alone: True keep untouched, False remove, None rewrite.

        Elements kept untouched are never decoded by pydicom, and written back byte for byte.
        """
        group = tag >> 16
        if group % 2 == 1 or group == 0x0002 or group >> 8 in (0x50, 0x60):
            return False
        action = self.actions.get(tag)
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

    def dataset(self, dataset: Dataset) -> None:
        for tag in list(dataset.keys()):
            settled = self._settled(int(tag), _vr_of(dataset.get_item(tag), tag))
            if settled is True:
                continue
            if settled is False or not self.element(dataset[tag]):
                del dataset[tag]


def _vr_of(element: DataElement | RawDataElement, tag: int) -> str:
    """The VR to decide by: as encoded, else (implicit VR, or UN for a known attribute, which
    pydicom corrects on decoding) from the data dictionary; unknown attributes are UN."""
    vr = element.VR
    if vr and vr != "UN":
        return vr
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def _method_codes() -> Sequence:
    items = []
    for option in DECLARED_OPTIONS:
        item = Dataset()
        item.CodeValue = option.code
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = option.meaning
        items.append(item)
    return Sequence(items)


def deidentify(dataset: Dataset, context: DeidContext) -> Dataset:
    """De-identify `dataset` in place and return it. The file meta is not touched here."""
    original_study_uid = str(dataset.get("StudyInstanceUID", "")).strip()
    original_accession = str(dataset.get("AccessionNumber", "") or "").strip()
    age = str(dataset.get("PatientAge", "") or "").strip()
    birth = str(dataset.get("PatientBirthDate", "") or "").strip()
    study_date = str(dataset.get("StudyDate", "") or "").strip()
    _Cleaner(context).dataset(dataset)

    keys, siteid = context.keys, context.siteid
    dataset.PatientName = context.pseudonym
    dataset.PatientID = context.pseudonym
    if not age and birth and study_date:
        derived = _age_from(birth, study_date)
        if derived:
            dataset.PatientAge = derived
    if "PatientBirthDate" in dataset:
        dataset.PatientBirthDate = None
    dataset.AccessionNumber = (
        keys.short_code("accession", siteid, original_accession) if original_accession else None
    )
    if original_study_uid:
        dataset.StudyID = keys.short_code("study-id", siteid, original_study_uid)
    dataset.ClinicalTrialSiteID = siteid
    dataset.ClinicalTrialSubjectID = context.pseudonym
    dataset.PatientIdentityRemoved = "YES"
    dataset.DeidentificationMethod = f"ricord-archive {__version__} PS3.15 E.1-1"
    dataset.DeidentificationMethodCodeSequence = _method_codes()
    dataset.LongitudinalTemporalInformationModified = "MODIFIED"
    # Provenance where RICORD tooling (the RSNA Anonymizer) looks for it.
    block = dataset.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "SH", context.project_name[:16])
    block.add_new(0x03, "SH", siteid)
    return dataset


def _age_from(birth: str, study_date: str) -> str:
    try:
        born = dt.datetime.strptime(birth, "%Y%m%d").date()
        seen = dt.datetime.strptime(study_date, "%Y%m%d").date()
    except ValueError:
        return ""
    years = seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))
    if years < 0:
        return ""
    return cap_age(f"{years:03d}Y")
