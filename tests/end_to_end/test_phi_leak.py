"""No planted PHI anywhere: not in blobs, PostgreSQL's files, logs, or any response."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pydicom
import pytest
import requests

from tests import dcmtk

pytestmark = pytest.mark.slow  # a server process, DCMTK, every byte of the data directory


def _needles(planted: set[str]) -> set[bytes]:
    """Each planted value, and each component of a person name, as bytes."""
    values = set(planted)
    for value in planted:
        values.update(part for part in value.split("^") if len(part) >= 4)
    return {v.encode() for v in values}


def _hits(blob: bytes, needles: set[bytes]) -> set[bytes]:
    return {n for n in needles if n in blob}


def _files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_planted_value_is_stored_logged_or_answered(make_archive, corpus, tmp_path,
                                                       log_format):
    archive = make_archive("phi", f'[server]\nlog_format = "{log_format}"\n')
    responses: list[bytes] = []

    # each names an issuer: its value, like the PatientID's, is never stored, logged or answered
    by_dimse, by_stow = corpus.patient(issuer=True), corpus.patient(issuer=True)
    dimse_files = corpus.study(by_dimse, dt.date(2021, 1, 10)) + corpus.study(
        by_dimse, dt.date(2021, 2, 10)
    )
    stow_files = corpus.study(by_stow, dt.date(2021, 3, 10)) + corpus.study(
        by_stow, dt.date(2021, 4, 10)
    )
    needles = _needles(corpus.corpus.planted)
    sent = b"".join(p.read_bytes() for p in corpus.corpus.files)
    assert _hits(sent, needles) == needles  # the scanner finds every value where it is

    stored = dcmtk.storescu(archive.dimse_port, dimse_files)
    assert stored.stderr.count("(Success)") == len(dimse_files)
    responses.append(stored.stdout.encode() + stored.stderr.encode())
    client = archive.client()
    client.store_instances([pydicom.dcmread(f) for f in stow_files])

    url = archive.dicomweb_url
    listing = requests.get(f"{url}/studies")
    responses.append(listing.content)
    study_uids = [s["0020000D"]["Value"][0] for s in listing.json()]
    assert len(study_uids) == 4
    for study_uid in study_uids:
        for suffix, accept in (
            ("", 'multipart/related; type="application/dicom"'),
            ("/metadata", "application/dicom+json"),
        ):
            response = requests.get(f"{url}/studies/{study_uid}{suffix}",
                                    headers={"Accept": accept})
            assert response.status_code == 200
            responses.append(response.content)
    found = dcmtk.findscu(archive.dimse_port, tmp_path / "find", {
        "PatientName": "", "PatientID": "", "AccessionNumber": "", "StudyDate": "",
        "ReferringPhysicianName": "", "StudyDescription": "", "PatientBirthDate": "",
        "InstitutionName": "", "StudyID": "",
    })
    assert len(found) == 4
    responses.extend(p.read_bytes() for p in (tmp_path / "find").glob("rsp*.dcm"))

    assert archive.stop() == 0  # PostgreSQL checkpointed and stopped: its files are final
    log_lines = [line for line in archive.log().splitlines() if line.strip()]
    assert all(line.startswith("{") == (log_format == "json") for line in log_lines)
    leaks = {}
    for path in [*_files_under(archive.data_dir), archive.log_path]:
        hits = _hits(path.read_bytes(), needles)
        if hits:
            leaks[str(path)] = hits
    for number, response in enumerate(responses):
        hits = _hits(response, needles)
        if hits:
            leaks[f"response {number}"] = hits
    assert leaks == {}
    assert any((archive.data_dir / "pg" / "data").rglob("000000010000000000000001"))
