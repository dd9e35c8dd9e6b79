"""The acceptance policy: what is refused, with which status, and counted per site."""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess

import asyncpg
import pydicom
import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.uid import UID

from ricord_archive.config import ConfigError, load_config
from ricord_archive.deid.policy import DEFAULT_SOP_CLASSES, check_acceptable, sop_class_uids
from ricord_archive.errors import NotAuthorized, SopClassRefused
from tests import dcmtk, load

pytestmark = pytest.mark.slow  # a server process per test

CT = "1.2.840.10008.5.1.4.1.1.2"
REFUSED = {
    "1.2.840.10008.5.1.4.1.1.7": "secondary-capture",
    "1.2.840.10008.5.1.4.1.1.7.4": "secondary-capture",
    "1.2.840.10008.5.1.4.1.1.6.1": "ultrasound",
    "1.2.840.10008.5.1.4.1.1.3.1": "ultrasound",
    "1.2.840.10008.5.1.4.1.1.88.33": "structured-report",
    "1.2.840.10008.5.1.4.1.1.104.1": "encapsulated-document",
    "1.2.840.10008.5.1.4.1.1.481.1": "sop-class-not-accepted",  # RT Image
}


def dataset(sop_class: str, **attributes: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(("sop_class", "reason"), REFUSED.items())
def test_refused_classes_name_their_reason(sop_class, reason):
    """Always-refused classes stay refused even when a site lists them."""
    listed = set() if reason == "sop-class-not-accepted" else {sop_class}
    with pytest.raises(SopClassRefused) as refused:
        check_acceptable(dataset(sop_class), DEFAULT_SOP_CLASSES | listed)
    assert refused.value.reason == reason
    assert refused.value.dimse_status == 0x0122


def test_burned_in_annotation_is_refused_as_not_authorized():
    with pytest.raises(NotAuthorized) as refused:
        check_acceptable(dataset(CT, BurnedInAnnotation="YES"), DEFAULT_SOP_CLASSES)
    assert refused.value.reason == "burned-in-annotation"
    check_acceptable(dataset(CT, BurnedInAnnotation="NO"), DEFAULT_SOP_CLASSES)


def test_key_object_selection_is_not_refused_as_a_structured_report():
    check_acceptable(dataset("1.2.840.10008.5.1.4.1.1.88.59"), DEFAULT_SOP_CLASSES)


def test_default_classes_cover_images_and_the_objects_that_reference_them():
    names = {UID(uid).name for uid in DEFAULT_SOP_CLASSES}
    for expected in ("CT Image Storage", "Enhanced CT Image Storage", "MR Image Storage",
                     "Computed Radiography Image Storage", "Segmentation Storage",
                     "Key Object Selection Document Storage",
                     "Grayscale Softcopy Presentation State Storage",
                     "Nuclear Medicine Image Storage"):
        assert expected in names


def test_sop_classes_by_keyword_or_uid_and_bad_names_refused():
    assert sop_class_uids(["CTImageStorage", "1.2.840.10008.5.1.4.1.1.4"]) == {
        CT, "1.2.840.10008.5.1.4.1.1.4"
    }
    with pytest.raises(ValueError):
        sop_class_uids(["NoSuchStorage"])
    with pytest.raises(ValueError):
        sop_class_uids(["1.2.03"])


def test_site_sop_classes_from_config(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[[sites]]\nname = "a"\nsop_classes = ["CTImageStorage"]\n')
    assert load_config(path, env={}).site_named("a").sop_classes == {CT}
    path.write_text('[[sites]]\nname = "a"\nsop_classes = ["Nope"]\n')
    with pytest.raises(ConfigError):
        load_config(path, env={})


def _refusal_counts(archive) -> dict[tuple[str, str], int]:
    url = subprocess.run(archive.command("db-url"), capture_output=True, text=True, check=True)

    async def fetch() -> list:
        conn = await asyncpg.connect(url.stdout.strip())
        try:
            return await conn.fetch(
                "SELECT site.name, r.reason, r.count "
                "FROM refusal r JOIN site ON site.id = r.site_id"
            )
        finally:
            await conn.close()

    return {(r["name"], r["reason"]): r["count"] for r in asyncio.run(fetch())}


def test_refusals_over_both_protocols_are_counted_per_site(make_archive, corpus, tmp_path):
    archive = make_archive("policy", '[[sites]]\nname = "ct-only"\naets = ["PACS_CT"]\n'
                           'sop_classes = ["CTImageStorage"]\n')
    [ct] = corpus.study(corpus.patient(), dt.date(2020, 2, 2), slices=1)
    secondary = pydicom.dcmread(ct)
    secondary.SOPClassUID = secondary.file_meta.MediaStorageSOPClassUID = (
        "1.2.840.10008.5.1.4.1.1.7"
    )
    secondary.SOPInstanceUID = secondary.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.99"
    burned = pydicom.dcmread(ct)
    burned.BurnedInAnnotation = "YES"
    burned.SOPInstanceUID = burned.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.98"
    mr = pydicom.dcmread(ct)
    mr.SOPClassUID = mr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    mr.SOPInstanceUID = mr.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.97"
    paths = []
    for name, ds in (("sc", secondary), ("burned", burned), ("mr", mr)):
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path)
        paths.append(path)

    statuses = []
    for path in paths:
        result = dcmtk.storescu(archive.dimse_port, [path], calling="PACS_CT")
        statuses.append(result.stderr.split("Received Store Response (")[1].split(")")[0])
    assert statuses == [
        "Refused: SOPClassNotSupported", "Unknown Status: 0x124", "Refused: SOPClassNotSupported"
    ]

    stored = archive.client().store_instances([secondary, burned, pydicom.dcmread(ct)])
    reasons = [item.FailureReason for item in stored.FailedSOPSequence]
    assert reasons == [0x0122, 0x0124]
    assert len(stored.ReferencedSOPSequence) == 1
    assert _refusal_counts(archive) == {
        ("ct-only", "secondary-capture"): 2,
        ("ct-only", "burned-in-annotation"): 2,
        ("ct-only", "sop-class-not-accepted"): 1,
    }
    assert len(load.stored_blobs(archive.data_dir)) == 1


def _changed_copy(path, tmp_path):
    """The same object (same SOP Instance UID) with other pixel values."""
    changed = pydicom.dcmread(path)
    changed.PixelData = bytes(len(changed.PixelData))
    out = tmp_path / "changed.dcm"
    changed.save_as(out)
    return out


def _stored_pixels(archive) -> bytes:
    [study] = archive.client().search_for_studies()
    [stored] = archive.client().retrieve_study(
        study["0020000D"]["Value"][0], media_types=(("application/dicom", "*"),)
    )
    return stored.PixelData


@pytest.mark.parametrize("policy", ["keep-first", "reject", "overwrite"])
def test_duplicate_policy_for_other_content(make_archive, corpus, tmp_path, policy):
    archive = make_archive("dup", f'[ingest]\nduplicates = "{policy}"\n')
    [original] = corpus.study(corpus.patient(), dt.date(2021, 2, 3), slices=1)
    changed = _changed_copy(original, tmp_path)
    assert "(Success)" in dcmtk.storescu(archive.dimse_port, [original]).stderr
    first_pixels = _stored_pixels(archive)
    identical = dcmtk.storescu(archive.dimse_port, [original]).stderr
    assert "Received Store Response (Success)" in identical  # identical re-send: no change
    status = dcmtk.storescu(archive.dimse_port, [changed]).stderr.split(
        "Received Store Response (")[1].split(")")[0]
    try:
        answer = archive.client().store_instances([pydicom.dcmread(changed)])
    except requests.HTTPError as exc:  # 409: every object failed
        assert exc.response.status_code == 409
        answer = Dataset.from_json(exc.response.json())
    if policy == "keep-first":
        assert status == "Warning: ElementsDiscarded"
        assert answer.ReferencedSOPSequence[0].WarningReason == 0xB006
        assert _stored_pixels(archive) == first_pixels
    elif policy == "reject":
        assert status.endswith("0x111")
        assert answer.FailedSOPSequence[0].FailureReason == 0x0111
        assert _stored_pixels(archive) == first_pixels
    else:
        assert status == "Success"
        assert "FailedSOPSequence" not in answer
        assert _stored_pixels(archive) == bytes(len(first_pixels))
    assert len(load.stored_blobs(archive.data_dir)) == 1
    [study] = archive.client().search_for_studies()
    assert study["00201208"]["Value"] == [1]
