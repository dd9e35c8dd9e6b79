"""The de-identification engine on pydicom: `deidentify(dataset, context)` rewrites a parsed
dataset, applying the decisions of `rules.Rules` at every depth, then the attributes
`rules.inserted` lists. The reference for the byte walker (`walker.py`) and the path for every
object the walker does not handle."""

from __future__ import annotations

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from ricord_archive.deid.rules import (
    EMPTIED,
    DeidContext,
    DeidentificationError,
    Inserted,
    MapValues,
    Originals,
    Rules,
    SetValue,
    cap_age,
    decision_vr,
    inserted,
    shift_date,
    shift_datetime,
)

__all__ = ["NO_PATIENT_ID", "DeidContext", "DeidentificationError", "cap_age", "deidentify",
           "issuer_of", "patient_id_of", "shift_date", "shift_datetime"]


NO_PATIENT_ID = "the object has no PatientID (0010,0020)"


def patient_id_of(dataset: Dataset) -> str:
    """The original PatientID, required: objects without one are refused, never merged."""
    value = dataset.get("PatientID")
    text = str(value).strip() if value is not None else ""
    if not text:
        raise DeidentificationError(NO_PATIENT_ID)
    return text


def issuer_of(dataset: Dataset) -> str:
    """The original IssuerOfPatientID (0010,0021), "" when absent or empty."""
    value = dataset.get("IssuerOfPatientID")
    return str(value).strip() if value is not None else ""


class _Cleaner:
    def __init__(self, context: DeidContext) -> None:
        self.rules = Rules(context)

    def element(self, element: DataElement) -> bool:
        """Rewrite one element in place; return False when it must be removed."""
        tag = int(element.tag)
        if element.VR == "SQ":
            fate = self.rules.sequence(tag)
            if fate is None:
                return False
            if fate == EMPTIED:
                element.value = Sequence()
                return True
            for item in element.value or ():
                self.dataset(item)
            return True
        edit = self.rules.edit(tag, element.VR)
        if isinstance(edit, bool):
            return edit
        if isinstance(edit, SetValue):
            element.value = edit.value
            return True
        _map_values(element, edit)
        return True

    def dataset(self, dataset: Dataset) -> None:
        for tag in list(dataset.keys()):
            element = dataset.get_item(tag)
            settled = self.rules.settled(int(tag), decision_vr(element.VR, int(tag)))
            if settled is True:
                continue
            if settled is False or not self.element(dataset[tag]):
                del dataset[tag]


def _map_values(element: DataElement, edit: MapValues) -> None:
    value = element.value
    if value is None or value == "":
        return
    if isinstance(value, MultiValue | list):
        element.value = [edit.fn(str(v)) for v in value]
    else:
        element.value = edit.fn(str(value))


def _text(dataset: Dataset, keyword: str) -> str:
    return str(dataset.get(keyword, "") or "").strip()


def _set(dataset: Dataset, attribute: Inserted) -> None:
    if attribute.vr == "SQ":
        assert not isinstance(attribute.value, str)  # a sequence's value is its items
        items = []
        for members in attribute.value or ():
            item = Dataset()
            for member in members:
                _set(item, member)
            items.append(item)
        value: object = Sequence(items)
    else:
        value = attribute.value
    if attribute.tag in dataset:
        dataset[attribute.tag].value = value
    elif not attribute.only_if_present:
        dataset.add_new(attribute.tag, attribute.vr, value)


def deidentify(dataset: Dataset, context: DeidContext) -> Dataset:
    """De-identify `dataset` in place and return it. The file meta is not touched here."""
    originals = Originals(
        study_uid=str(dataset.get("StudyInstanceUID", "")).strip(),
        accession=_text(dataset, "AccessionNumber"),
        age=_text(dataset, "PatientAge"),
        birth=_text(dataset, "PatientBirthDate"),
        study_date=_text(dataset, "StudyDate"),
    )
    _Cleaner(context).dataset(dataset)
    for attribute in inserted(context, originals):
        _set(dataset, attribute)
    return dataset
