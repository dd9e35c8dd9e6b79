"""References between objects survive de-identification, whatever the order and the protocol.

A CT series of three slices and an object pointing at them (a Key Object Selection document or a
Grayscale Softcopy Presentation State) are sent in both orders (the referencing object first,
then the images, and the reverse) and over both protocols (the referencing object over STOW-RS
and the images over DIMSE, and vice versa), one patient per combination. Retrieved over WADO-RS,
every UID the referencing object points at must be the de-identified UID of a stored image.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
    generate_uid,
)

from ricord_archive.deid.policy import DEFAULT_SOP_CLASSES
from tests import dcmtk
from tests.conftest import Archive
from tests.phi_trap import PhiTrap

pytestmark = pytest.mark.slow  # a server process per test

ORDERS = ("references first", "images first")
PROTOCOLS = ("stow", "dimse")  # the referencing object's; the images take the other one


def code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def sop_reference(image: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = image.SOPClassUID
    item.ReferencedSOPInstanceUID = image.SOPInstanceUID
    return item


def referencing_base(images: list[Dataset], sop_class: str, modality: str) -> Dataset:
    """The patient and study of the images, a series and an instance of its own."""
    first = images[0]
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "StudyTime",
                    "AccessionNumber", "StudyID", "ReferringPhysicianName"):
        setattr(ds, keyword, first[keyword].value)
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    return ds


def key_object(images: list[Dataset]) -> Dataset:
    ds = referencing_base(images, KeyObjectSelectionDocumentStorage, "KO")
    ds.ContentDate, ds.ContentTime = images[0].StudyDate, "120000"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = [code("113000", "DCM", "Of Interest")]
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "2010"
    ds.ContentTemplateSequence = [template]
    series = Dataset()
    series.SeriesInstanceUID = images[0].SeriesInstanceUID
    series.ReferencedSOPSequence = [sop_reference(image) for image in images]
    evidence = Dataset()
    evidence.StudyInstanceUID = images[0].StudyInstanceUID
    evidence.ReferencedSeriesSequence = [series]
    ds.CurrentRequestedProcedureEvidenceSequence = [evidence]
    ds.ContentSequence = [image_item(image) for image in images]
    return ds


def image_item(image: Dataset) -> Dataset:
    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", "IMAGE"
    item.ReferencedSOPSequence = [sop_reference(image)]
    return item


def presentation_state(images: list[Dataset]) -> Dataset:
    ds = referencing_base(images, GrayscaleSoftcopyPresentationStateStorage, "PR")
    ds.ContentLabel = "KEY_IMAGES"
    ds.PresentationCreationDate, ds.PresentationCreationTime = images[0].StudyDate, "120000"
    series = Dataset()
    series.SeriesInstanceUID = images[0].SeriesInstanceUID
    series.ReferencedImageSequence = [sop_reference(image) for image in images]
    ds.ReferencedSeriesSequence = [series]
    return ds


REFERENCING = {"kos": (key_object, 6), "gsps": (presentation_state, 3)}  # builder, references


def write(ds: Dataset, path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return path


def send(archive: Archive, protocol: str, files: list[Path]) -> None:
    """Each call is an association (DIMSE) or a request (STOW-RS) of its own."""
    if protocol == "dimse":
        result = dcmtk.storescu(archive.dimse_port, files)
        assert result.stderr.count("(Success)") == len(files), result.stderr + archive.log()
        return
    try:
        answer = archive.client().store_instances([pydicom.dcmread(f) for f in files])
    except requests.HTTPError as exc:
        pytest.fail(f"STOW-RS refused: {exc}; the archive logged:\n{archive.log()[-1500:]}")
    assert "FailedSOPSequence" not in answer, archive.log()[-1500:]
    assert len(answer.ReferencedSOPSequence) == len(files)


def walk(dataset: Dataset, depth: int = 0) -> Iterator[tuple[int, Dataset]]:
    """Every item of every sequence, with its depth (the object itself is depth 0)."""
    yield depth, dataset
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value:
                yield from walk(item, depth + 1)


def check_references(client: DICOMwebClient, study_uid: str, expected_references: int) -> None:
    retrieved = client.retrieve_study(study_uid)
    images = [ds for ds in retrieved if ds.SOPClassUID == CTImageStorage]
    others = [ds for ds in retrieved if ds.SOPClassUID != CTImageStorage]
    assert len(images) == 3 and len(others) == 1
    image_uids = {ds.SOPInstanceUID for ds in images}
    series_uids = {ds.SeriesInstanceUID for ds in images}
    referencing = others[0]
    assert referencing.StudyInstanceUID == study_uid
    referenced = []
    for depth, item in walk(referencing):
        if depth == 0:
            continue
        if "ReferencedSOPInstanceUID" in item:
            assert item.ReferencedSOPClassUID == CTImageStorage
            referenced.append(item.ReferencedSOPInstanceUID)
        if "SeriesInstanceUID" in item:
            assert item.SeriesInstanceUID in series_uids
        if "StudyInstanceUID" in item:
            assert item.StudyInstanceUID == study_uid
    assert len(referenced) == expected_references
    assert set(referenced) == image_uids


def test_the_referencing_classes_are_accepted_by_default():
    assert KeyObjectSelectionDocumentStorage in DEFAULT_SOP_CLASSES
    assert GrayscaleSoftcopyPresentationStateStorage in DEFAULT_SOP_CLASSES


@pytest.mark.parametrize("kind", sorted(REFERENCING))
def test_references_resolve_in_any_order_over_any_protocol(kind, make_archive, tmp_path):
    build, expected_references = REFERENCING[kind]
    archive = make_archive(f"references-{kind}")
    trap = PhiTrap(seed=20260302, out_dir=tmp_path / "images")
    for number, (order, protocol) in enumerate((o, p) for o in ORDERS for p in PROTOCOLS):
        study = trap.study(trap.patient(), dt.date(2021, 6, 1 + number))
        images = trap.ct_series(study)
        referencing = write(build([pydicom.dcmread(f) for f in images]),
                            tmp_path / f"{kind}-{number}.dcm")
        other = "dimse" if protocol == "stow" else "stow"
        batches = [(protocol, [referencing]), (other, images)]
        if order == "images first":
            batches.reverse()
        for batch_protocol, files in batches:
            send(archive, batch_protocol, files)
    client = archive.client()
    studies = client.search_for_studies()
    assert len(studies) == 4
    for study in studies:
        check_references(client, study["0020000D"]["Value"][0], expected_references)
