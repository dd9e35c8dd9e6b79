"""Which objects the archive accepts at all. Pure: decides from the parsed dataset
(or, on the byte walker's path, from the two values it needs).

Some objects cannot be made safe by header de-identification, so they are refused whatever a
site allows: images flagged with burned-in annotation, Secondary Capture and Ultrasound images
(text in the pixels is likely and pixel cleaning is not offered), structured reports and
encapsulated documents (free text). Every other object must be of a SOP class the site accepts.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import sop_class

from ricord_archive.errors import NotAuthorized, SopClassRefused

# The default per site: the image classes research sites send and the objects that point at them.
DEFAULT_SOP_CLASSES = frozenset(
    str(getattr(sop_class, name))
    for name in (
        "CTImageStorage", "EnhancedCTImageStorage", "LegacyConvertedEnhancedCTImageStorage",
        "MRImageStorage", "EnhancedMRImageStorage", "EnhancedMRColorImageStorage",
        "LegacyConvertedEnhancedMRImageStorage",
        "ComputedRadiographyImageStorage",
        "DigitalXRayImageStorageForPresentation", "DigitalXRayImageStorageForProcessing",
        "PositronEmissionTomographyImageStorage", "EnhancedPETImageStorage",
        "LegacyConvertedEnhancedPETImageStorage",
        "NuclearMedicineImageStorage",
        "SegmentationStorage",
        "KeyObjectSelectionDocumentStorage",
        "GrayscaleSoftcopyPresentationStateStorage", "ColorSoftcopyPresentationStateStorage",
        "BlendingSoftcopyPresentationStateStorage",
    )
) | {"1.2.840.10008.5.1.4.1.1.11.3"}  # Pseudo-Color Softcopy Presentation State

_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and .7.1 to .7.4, the multi-frame forms
_ULTRASOUND = (
    "1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.3.1",  # image, multi-frame
    "1.2.840.10008.5.1.4.1.1.6.2",  # enhanced US volume
    "1.2.840.10008.5.1.4.1.1.6.3",  # photoacoustic
)
_STRUCTURED_REPORT = "1.2.840.10008.5.1.4.1.1.88."
_KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"  # an SR-family class of references
_ENCAPSULATED_DOCUMENT = "1.2.840.10008.5.1.4.1.1.104."


def sop_class_uids(names: Iterable[str]) -> frozenset[str]:
    """SOP class UIDs from UIDs or pynetdicom keywords (e.g. 'CTImageStorage')."""
    uids = set()
    for name in names:
        if name and name[0].isdigit():
            if not UID(name).is_valid:
                raise ValueError(f"{name!r} is not a valid UID")
            uids.add(name)
            continue
        uid = getattr(sop_class, name, None)
        if uid is None:
            raise ValueError(f"{name!r} is not a known storage SOP class keyword")
        uids.add(str(uid))
    return frozenset(uids)


def check_acceptable(dataset: Dataset, accepted: frozenset[str]) -> None:
    """Raise a RefusedObject (with its reason label) when the object must not enter."""
    check_values(str(dataset.get("SOPClassUID", "")),
                 str(dataset.get("BurnedInAnnotation", "") or ""), accepted)


def check_values(sop_class_uid: str, burned_in_annotation: str, accepted: frozenset[str]) -> None:
    """`check_acceptable` on the object's SOP Class UID and BurnedInAnnotation as text."""
    uid = sop_class_uid.strip()
    if burned_in_annotation.strip().upper() == "YES":
        raise NotAuthorized(
            "refused: the image is flagged with burned-in annotation (BurnedInAnnotation YES)",
            "burned-in-annotation",
        )
    if uid == _SECONDARY_CAPTURE or uid.startswith(_SECONDARY_CAPTURE + "."):
        raise SopClassRefused("refused: Secondary Capture images may carry text in their "
                              "pixels, and pixel cleaning is not offered", "secondary-capture")
    if uid in _ULTRASOUND:
        raise SopClassRefused("refused: Ultrasound images may carry text in their pixels, "
                              "and pixel cleaning is not offered", "ultrasound")
    if uid.startswith(_STRUCTURED_REPORT) and uid != _KEY_OBJECT_SELECTION:
        raise SopClassRefused("refused: structured reports carry free text",
                              "structured-report")
    if uid.startswith(_ENCAPSULATED_DOCUMENT):
        raise SopClassRefused("refused: encapsulated documents carry free text",
                              "encapsulated-document")
    if uid not in accepted:
        raise SopClassRefused("refused: this SOP class is not accepted for this site",
                              "sop-class-not-accepted")
