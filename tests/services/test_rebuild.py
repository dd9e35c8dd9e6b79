"""`ricord-archive rebuild-index`: the index dropped on purpose comes back from the blob store,
with the same answers, byte-identical retrieval, and returning patients keeping their
pseudonyms and date offsets."""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import subprocess

import pydicom
import pytest
import requests

from ricord_archive.blobstore import FileBlobStore
from tests import dcmtk
from tests.conftest import Archive

pytestmark = pytest.mark.slow  # a server process, stopped and rebuilt


def studies(archive: Archive) -> dict[str, tuple[str, str, int]]:
    """Study UID -> (pseudonymous PatientID, shifted StudyDate, instances)."""
    return {s["0020000D"]["Value"][0]: (s["00100020"]["Value"][0], s["00080020"]["Value"][0],
                                        s["00201208"]["Value"][0])
            for s in archive.client().search_for_studies()}


def digests(archive: Archive) -> dict[str, str]:
    """SOP Instance UID -> SHA-256 of the stored object as WADO-URI returns it."""
    found = {}
    for study in archive.client().search_for_studies():
        study_uid = study["0020000D"]["Value"][0]
        for item in archive.client().search_for_instances(study_uid):
            series, sop = item["0020000E"]["Value"][0], item["00080018"]["Value"][0]
            body = requests.get(f"{archive.root}/wado", timeout=60, params={
                "requestType": "WADO", "studyUID": study_uid, "seriesUID": series,
                "objectUID": sop, "contentType": "application/dicom"}).content
            found[sop] = hashlib.sha256(body).hexdigest()
    return found


def test_rebuild_index_restores_a_dropped_index(make_archive, corpus):
    archive = make_archive("rebuild")
    first, second = corpus.patient(), corpus.patient()
    by_dimse = corpus.study(first, dt.date(2020, 3, 1), slices=3)
    assert dcmtk.storescu(archive.dimse_port, by_dimse).stderr.count("(Success)") == 3
    archive.client().store_instances(
        [pydicom.dcmread(f) for f in corpus.study(second, dt.date(2020, 4, 2), slices=2)]
    )
    before, stored = studies(archive), digests(archive)
    assert len(before) == 2 and len(stored) == 5

    assert archive.stop() == 0
    shutil.rmtree(archive.data_dir / "pg")  # the index is gone; blobs and records remain
    as_before = FileBlobStore(archive.data_dir / "blobs")  # one blob as archives stored it
    [(key, _, _), *_] = as_before.walk()  # before segments: a file of its own
    with as_before.open(key) as stream:
        as_before.write(as_before.new_key(), stream.read())
    as_before.delete(key)
    rebuilt = subprocess.run(archive.command("rebuild-index"), capture_output=True, text=True,
                             timeout=300)
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert "indexed instances: 5" in rebuilt.stdout
    assert "patients without an allocation record: 0" in rebuilt.stdout

    archive.start()
    assert studies(archive) == before
    assert digests(archive) == stored

    # the first patient returns: same pseudonym, and the interval between studies is kept
    later = corpus.study(first, dt.date(2020, 3, 31), slices=1)
    assert "(Success)" in dcmtk.storescu(archive.dimse_port, later).stderr
    after = studies(archive)
    [new_study] = set(after) - set(before)
    [old_study] = [uid for uid, (_, _, count) in before.items() if count == 3]
    assert after[new_study][0] == before[old_study][0]
    shifted = [dt.datetime.strptime(after[uid][1], "%Y%m%d") for uid in (old_study, new_study)]
    assert (shifted[1] - shifted[0]).days == 30

    assert archive.stop() == 0
    again = subprocess.run(archive.command("rebuild-index"), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 2 and "the index is not empty" in again.stderr
