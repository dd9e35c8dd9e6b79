"""Cohorts end to end (issue #14): frozen selections of series, their NBIA manifest and
metadata.csv, the whole cohort as one streamed ZIP64 (Range, zipfile, `unzip -t`), WADO-RS
application/zip, the CLI's resumable download across a restart, site scoping, the audit trail."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import itertools
import json
import random
import subprocess
import sys
import time
import zipfile
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from tests import dcmtk
from tests.conftest import Archive
from tests.phi_corpus import PhiCorpus
from tests.test_audit import audit_events
from tests.web.test_auth import CONFIG as AUTH_CONFIG
from tests.web.test_auth import SITEIDS, TOKENS

pytestmark = pytest.mark.slow  # a server process per test

CONFIG = """
[[sites]]
name = "cohort-site"
siteid = "424242"
aets = ["STORESCU"]
"""
STORED = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}


def api(archive: Archive) -> str:
    return f"{archive.root}/api/cohorts"


def create(archive: Archive, filters: dict, name: str = "covid-ct", headers: dict | None = None,
           expect: int = 201) -> dict:
    response = requests.post(api(archive), json={
        "name": name, "description": "CT of COVID-19 patients", "license": "CC BY-NC 4.0",
        "citation": "RICORD test cohort", "filters": filters,
    }, headers=headers, timeout=60)
    assert response.status_code == expect, response.text
    return response.json()


def stored_bytes(archive: Archive, study: str, series: str | None = None) -> list[bytes]:
    """The stored objects of a study or series by WADO-RS, as sent (transfer-syntax=*)."""
    url = f"{archive.dicomweb_url}/studies/{study}" + (f"/series/{series}" if series else "")
    response = requests.get(url, headers=STORED, timeout=60)
    assert response.status_code == 200, response.text[:200]
    head = f"Content-Type: {response.headers['Content-Type']}\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + response.content)
    return [part.get_payload(decode=True) for part in message.iter_parts()]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """An archive with three patients' studies: two CT studies (3 and 4 slices), one MR."""
    base = tmp_path_factory.mktemp("cohorts")
    (base / "config.toml").write_text(CONFIG)
    archive = Archive(base / "data", base / "archive.log", base / "config.toml").start()
    corpus = PhiCorpus(seed=1414, out_dir=base / "corpus")
    files = [
        *corpus.study(corpus.patient(), dt.date(2021, 3, 1), slices=3, size=64),
        *corpus.study(corpus.patient(), dt.date(2021, 4, 1), slices=4, size=64),
        *corpus.study(corpus.patient(), dt.date(2021, 5, 1), slices=2, modality="MR", size=32),
    ]
    sent = dcmtk.storescu(archive.dimse_port, files)
    assert sent.returncode == 0, sent.stderr
    yield archive, corpus, files
    archive.stop()


def ct_series(archive: Archive) -> list[dict]:
    return requests.get(f"{archive.dicomweb_url}/series", params={"Modality": "CT"},
                        timeout=30).json()


def uid(document: dict, tag: str) -> str:
    return document[tag]["Value"][0]


def test_create_list_get_delete(site):
    archive, _, _ = site
    cohort = create(archive, {"Modality": "CT", "StudyDate": "19000101-"})
    assert cohort["counts"] == {"studies": 2, "series": 2, "instances": 7}
    assert len(ct_series(archive)) == 2
    assert cohort["bytes"] > 7 * 64 * 64 * 2
    assert cohort["filters"] == {"Modality": "CT", "StudyDate": "19000101-"}
    shown = requests.get(f"{api(archive)}/{cohort['id']}", timeout=30).json()
    assert shown == cohort
    listed = requests.get(api(archive), timeout=30).json()
    assert cohort["id"] in [c["id"] for c in listed]
    mr = create(archive, {"ModalitiesInStudy": "MR"}, name="mr")
    assert mr["counts"] == {"studies": 1, "series": 1, "instances": 2}
    assert requests.delete(f"{api(archive)}/{mr['id']}", timeout=30).status_code == 204
    assert requests.get(f"{api(archive)}/{mr['id']}", timeout=30).status_code == 404
    assert requests.delete(f"{api(archive)}/{mr['id']}", timeout=30).status_code == 404


@pytest.mark.parametrize(("body", "message"), [
    ({"name": "../x", "filters": {}}, "name"),
    ({"name": "x", "filters": {"NoSuchColumn": "1"}}, "NoSuchColumn"),
    ({"name": "x", "filters": {"SOPInstanceUID": "1.2"}}, "series level"),
    ({"name": "x", "filters": {"StudyDate": "yesterday"}}, "StudyDate"),
    ({"name": "x", "filters": ["Modality"]}, "filters"),
    ({"name": "x", "secret": 1}, "unknown fields"),
])
def test_bad_definitions_are_refused(site, body, message):
    archive, _, _ = site
    response = requests.post(api(archive), json=body, timeout=30)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_a_filter_that_matches_nothing_is_refused_and_never_stored(site):
    """An original PatientID typed as a filter by mistake matches no pseudonym: the cohort is
    refused, so the value is kept nowhere (not in the index, not in an answer)."""
    archive, _, files = site
    original = pydicom.dcmread(files[0]).PatientID
    before = requests.get(api(archive), timeout=30).json()
    response = requests.post(api(archive), json={"name": "mistake",
                                                 "filters": {"PatientID": original}}, timeout=30)
    assert response.status_code == 400
    assert "no series match" in response.json()["error"]
    assert original not in response.text
    assert requests.get(api(archive), timeout=30).json() == before


def test_a_cohort_is_frozen_against_later_arrivals(site, tmp_path):
    archive, corpus, files = site
    cohort = create(archive, {"Modality": "CT"}, name="frozen")
    # one more image into a series of the cohort, and a new CT study
    extra = pydicom.dcmread(files[0])
    extra.SOPInstanceUID = extra.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    extra.InstanceNumber = 99
    extra.save_as(tmp_path / "extra.dcm")
    later = corpus.study(corpus.patient(), dt.date(2022, 1, 1), slices=2, size=32)
    sent = dcmtk.storescu(archive.dimse_port, [tmp_path / "extra.dcm", *later])
    assert sent.returncode == 0, sent.stderr
    again = requests.get(f"{api(archive)}/{cohort['id']}", timeout=30).json()
    assert again["counts"] == cohort["counts"] and again["bytes"] == cohort["bytes"]
    listing = requests.get(f"{api(archive)}/{cohort['id']}/files", timeout=30).json()
    assert len([f for f in listing["files"] if f["path"].endswith(".dcm")]) == 7
    fresh = create(archive, {"Modality": "CT"}, name="fresh")
    assert fresh["counts"] == {"studies": 3, "series": 3, "instances": 10}


def test_manifest_and_metadata_csv(site):
    archive, _, _ = site
    cohort = create(archive, {"Modality": "CT"}, name="manifest-test")
    response = requests.get(f"{api(archive)}/{cohort['id']}/manifest.tcia", timeout=30)
    assert response.status_code == 200
    lines = response.text.splitlines()
    assert lines[:6] == [
        f"downloadServerUrl={api(archive)}/{cohort['id']}/archive.zip",
        "includeAnnotation=true", "noOfrRetry=4", "databasketId=manifest-test.tcia",
        "manifestVersion=3.0", "ListOfSeriesToDownload=",
    ]
    files = requests.get(f"{api(archive)}/{cohort['id']}/files", timeout=30).json()["files"]
    folders = list(dict.fromkeys(f["path"].rsplit("/", 1)[0] for f in files
                                 if f["path"].endswith(".dcm")))
    assert lines[6:] == [folder.split("/")[2] for folder in folders]

    response = requests.get(f"{api(archive)}/{cohort['id']}/metadata.csv", timeout=30)
    assert response.headers["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert list(rows[0]) == [
        "Series UID", "Collection", "Subject ID", "Study UID", "Study Description",
        "Study Date", "Series Description", "Manufacturer", "Modality", "SOP Class Name",
        "SOP Class UID", "Number of Images", "File Size", "File Location",
    ]
    assert [r["Series UID"] for r in rows] == lines[6:]
    by_series = {r["Series UID"]: r for r in rows}
    for document in ct_series(archive)[:2]:
        row = by_series.get(uid(document, "0020000E"))
        if row is None:  # the CT study sent after the cohort was frozen
            continue
        assert row["Subject ID"] == uid(document, "00100020")
        assert row["Study UID"] == uid(document, "0020000D")
        date = uid(document, "00080020")
        assert row["Study Date"] == f"{date[4:6]}-{date[6:]}-{date[:4]}"
        assert row["Modality"] == "CT" and row["Manufacturer"] == "ACME MEDICAL"
        assert row["SOP Class Name"] == "CT Image Storage"
        assert row["SOP Class UID"] == "1.2.840.10008.5.1.4.1.1.2"
        assert row["Collection"] == "manifest-test"
        blobs = stored_bytes(archive, row["Study UID"], row["Series UID"])
        assert int(row["Number of Images"]) == len(blobs)
        assert int(row["File Size"]) == sum(map(len, blobs))
        assert row["File Location"] == f"./{row['Subject ID']}/{row['Study UID']}/" \
            f"{row['Series UID']}"


def test_the_zip_holds_the_stored_bytes(site, tmp_path):
    archive, _, _ = site
    cohort = create(archive, {"Modality": "CT"}, name="zip-test")
    url = f"{api(archive)}/{cohort['id']}/archive.zip"
    head = requests.head(url, timeout=30)
    response = requests.get(url, timeout=60)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/zip"
    assert int(response.headers["Content-Length"]) == len(response.content)
    assert head.headers["Content-Length"] == response.headers["Content-Length"]
    assert response.headers["Accept-Ranges"] == "bytes"
    path = tmp_path / "cohort.zip"
    path.write_bytes(response.content)
    tested = subprocess.run(["unzip", "-t", str(path)], capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    listing = requests.get(f"{api(archive)}/{cohort['id']}/files", timeout=30).json()
    assert listing["archive"] == {"size": len(response.content),
                                  "etag": response.headers["ETag"]}
    with zipfile.ZipFile(path) as archive_file:
        assert archive_file.testzip() is None
        infos = archive_file.infolist()
        assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
        assert [i.filename for i in infos] == [f["path"] for f in listing["files"]]
        assert [i.filename for i in infos][-4:] == [
            "metadata.csv", "clinical.csv", "LICENSE.txt", "CITATION.txt"]
        assert archive_file.read("LICENSE.txt") == b"CC BY-NC 4.0"
        assert archive_file.read("CITATION.txt") == b"RICORD test cohort"
        assert archive_file.read("metadata.csv") == requests.get(
            f"{api(archive)}/{cohort['id']}/metadata.csv", timeout=30).content
        for listed in listing["files"]:
            data = archive_file.read(listed["path"])
            assert len(data) == listed["size"]
            assert hashlib.sha256(data).hexdigest() == listed["sha256"]
        dcm = [i.filename for i in infos if i.filename.endswith(".dcm")]
        assert len(dcm) == cohort["counts"]["instances"]
        for folder in dict.fromkeys(name.rsplit("/", 1)[0] for name in dcm):
            subject, study, series = folder.split("/")
            wado = stored_bytes(archive, study, series)
            mine = [archive_file.read(n) for n in dcm if n.startswith(folder + "/")]
            assert mine == wado
            assert pydicom.dcmread(io.BytesIO(mine[0])).PatientID == subject


def test_range_requests_resume_anywhere(site):
    archive, _, _ = site
    cohort = create(archive, {"Modality": "CT"}, name="range-test")
    url = f"{api(archive)}/{cohort['id']}/archive.zip"
    whole = requests.get(url, timeout=60)
    size, etag = len(whole.content), whole.headers["ETag"]
    cuts = [0, 1, 100, size // 3, size // 2, size - 300, size - 22, size]
    pieces = []
    for start, stop in itertools.pairwise(cuts):
        part = requests.get(url, headers={"Range": f"bytes={start}-{stop - 1}",
                                          "If-Range": etag}, timeout=60)
        assert part.status_code == 206
        assert part.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{size}"
        assert int(part.headers["Content-Length"]) == stop - start
        pieces.append(part.content)
    assert b"".join(pieces) == whole.content
    tail = requests.get(url, headers={"Range": "bytes=-10"}, timeout=30)
    assert tail.status_code == 206 and tail.content == whole.content[-10:]
    rest = requests.get(url, headers={"Range": f"bytes={size // 2}-"}, timeout=30)
    assert rest.content == whole.content[size // 2:]
    several = requests.get(url, headers={"Range": "bytes=0-9,20-29"}, timeout=30)
    assert several.status_code == 200 and several.content == whole.content  # the whole, once
    stale = requests.get(url, headers={"Range": "bytes=5-", "If-Range": '"other"'}, timeout=30)
    assert stale.status_code == 200 and stale.content == whole.content
    outside = requests.get(url, headers={"Range": f"bytes={size}-"}, timeout=30)
    assert outside.status_code == 416
    assert outside.headers["Content-Range"] == f"bytes */{size}"


def test_wado_rs_application_zip(site, tmp_path):
    archive, _, _ = site
    study = ct_series(archive)[0]
    study_uid, series_uid = uid(study, "0020000D"), uid(study, "0020000E")
    for path, uids in ((f"studies/{study_uid}", (study_uid,)),
                       (f"studies/{study_uid}/series/{series_uid}", (study_uid, series_uid))):
        response = requests.get(f"{archive.dicomweb_url}/{path}",
                                headers={"Accept": "application/zip"}, timeout=60)
        assert response.status_code == 200, response.text[:200]
        assert response.headers["Content-Type"] == "application/zip"
        assert int(response.headers["Content-Length"]) == len(response.content)
        target = tmp_path / f"{len(uids)}.zip"
        target.write_bytes(response.content)
        tested = subprocess.run(["unzip", "-t", str(target)], capture_output=True, text=True)
        assert tested.returncode == 0, tested.stdout + tested.stderr
        with zipfile.ZipFile(target) as zipped:
            assert zipped.testzip() is None
            names = zipped.namelist()
            assert all(n.split("/")[1:3] == [study_uid, series_uid] for n in names)
            assert [zipped.read(n) for n in names] == stored_bytes(archive, *uids)
    multipart = requests.get(f"{archive.dicomweb_url}/studies/{study_uid}",
                             headers={"Accept": "application/zip, multipart/related; "
                                      "type=application/dicom"}, timeout=60)
    assert multipart.headers["Content-Type"] == "application/zip"


def test_downloads_are_audited_with_counts_only(site):
    archive, _, _ = site
    cohort = create(archive, {"Modality": "CT"}, name="audited")
    base = f"{api(archive)}/{cohort['id']}"
    zipped = requests.get(f"{base}/archive.zip", headers={"Range": "bytes=10-109"}, timeout=30)
    assert zipped.status_code == 206
    for name in ("manifest.tcia", "metadata.csv"):
        assert requests.get(f"{base}/{name}", timeout=30).status_code == 200
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # events are written in batches every 100 ms
        events = [e for e in audit_events(archive, "--limit", "1000")
                  if (e.get("detail") or {}).get("cohort") == cohort["id"]]
        if len(events) == 3:
            break
    resources = {e["resource"]: e for e in events}
    assert set(resources) == {f"/api/cohorts/{{id}}/{n}"
                              for n in ("archive.zip", "manifest.tcia", "metadata.csv")}
    assert resources["/api/cohorts/{id}/archive.zip"]["detail"] == {
        "cohort": cohort["id"], "studies": cohort["counts"]["studies"], "bytes": 100,
        "status": 206}
    assert "audited" not in json.dumps(events)


def test_site_scoping_with_authentication(make_archive, corpus):
    archive = make_archive("auth", AUTH_CONFIG)
    a = corpus.study(corpus.patient(), dt.date(2021, 1, 2), slices=2)
    b = corpus.study(corpus.patient(), dt.date(2021, 1, 3), slices=3)
    for token, files in (("upload-a", a), ("upload-b", b)):
        client_headers = {"Authorization": f"Bearer {TOKENS[token]}"}
        response = requests.post(
            f"{archive.dicomweb_url}/studies",
            files=None, data=_multipart(files)[0], timeout=60,
            headers={**client_headers, "Content-Type": _multipart(files)[1]})
        assert response.status_code == 200, response.text

    def auth(name: str) -> dict:
        return {"Authorization": f"Bearer {TOKENS[name]}"}

    assert requests.get(api(archive), timeout=30).status_code == 401
    mine = create(archive, {"Modality": "CT"}, "site-a-ct", auth("upload-a"))
    assert mine["counts"] == {"studies": 1, "series": 1, "instances": 2}
    assert mine["site"] == "site-a"
    everything = create(archive, {"Modality": "CT"}, "all-ct", auth("research"))
    assert everything["counts"]["instances"] == 5
    only_b = create(archive, {"ClinicalTrialSiteID": SITEIDS["site-b"]}, "b", auth("admin"))
    assert only_b["counts"]["instances"] == 3
    seen_by_a = [c["id"] for c in requests.get(api(archive), headers=auth("upload-a"),
                                               timeout=30).json()]
    assert seen_by_a == [mine["id"]]
    other = f"{api(archive)}/{everything['id']}"
    assert requests.get(other, headers=auth("upload-b"), timeout=30).status_code == 404
    assert requests.get(f"{other}/archive.zip", headers=auth("upload-a"),
                        timeout=30).status_code == 404
    assert requests.get(f"{other}/archive.zip", headers=auth("research"),
                        timeout=30).status_code == 200
    assert requests.delete(other, headers=auth("research"), timeout=30).status_code == 403
    assert requests.delete(other, headers=auth("upload-a"), timeout=30).status_code == 403
    assert requests.delete(other, headers=auth("admin"), timeout=30).status_code == 204


def _multipart(files: list[Path]) -> tuple[bytes, str]:
    boundary = "cohort-test-boundary"
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + f.read_bytes() + b"\r\n" for f in files
    ) + f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def test_clinical_columns_filter_the_cohort_and_fill_clinical_csv(make_archive, tmp_path):
    """A sheet of the original identifiers (CSV writer) imported before one study's images and
    after the others'; the cohort keeps the studies whose rows match, clinical.csv their rows."""
    archive = make_archive("clinical", CONFIG)
    corpus = PhiCorpus(seed=77, out_dir=tmp_path / "corpus")
    people = [corpus.patient() for _ in range(3)]
    studies = [corpus.study(p, dt.date(2021, 6, 1 + n), slices=2) for n, p in enumerate(people)]
    assert dcmtk.storescu(archive.dimse_port, [*studies[0], *studies[1]]).returncode == 0
    sheet = io.StringIO()
    writer = csv.writer(sheet)
    writer.writerow(["PatientID", "StudyInstanceUID", "Age", "Sex", "TestResult"])
    for person, files, age, result in zip(people, studies, (34, 70, 50),
                                          ("POSITIVE", "POSITIVE", "DETECTED"), strict=True):
        study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
        writer.writerow([person.patient_id, study_uid, age, "F", result])
    imported = requests.post(f"{archive.root}/api/clinical", data=sheet.getvalue().encode(),
                             headers={"Content-Type": "text/csv"}, timeout=60)
    assert imported.status_code == 200, imported.text
    assert dcmtk.storescu(archive.dimse_port, studies[2]).returncode == 0  # after the sheet

    cohort = create(archive, {"TestResult": "POSITIVE", "Age": "18-65", "Modality": "CT"},
                    name="positive-adults")
    assert cohort["counts"] == {"studies": 2, "series": 2, "instances": 4}
    zipped = requests.get(f"{api(archive)}/{cohort['id']}/archive.zip", timeout=60)
    with zipfile.ZipFile(io.BytesIO(zipped.content)) as archive_file:
        rows = list(csv.DictReader(io.StringIO(archive_file.read("clinical.csv").decode())))
        subjects = {n.split("/")[0] for n in archive_file.namelist() if n.endswith(".dcm")}
    assert sorted(int(r["Age"]) for r in rows) == [34, 50]
    assert {r["TestResult"] for r in rows} == {"POSITIVE"}
    assert {r["PatientID"] for r in rows} == subjects
    base = f"{api(archive)}/{cohort['id']}"
    everything = zipped.content + json.dumps(cohort).encode() + b"".join(
        requests.get(f"{base}/{name}", timeout=30).content
        for name in ("manifest.tcia", "metadata.csv", "files"))
    for planted in corpus.corpus.planted:
        assert planted.encode() not in everything
    refused = requests.post(api(archive), json={"name": "x", "filters": {"Age": "old"}},
                            timeout=30)
    assert refused.status_code == 400


def cli(archive: Archive, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ricord_archive", "cohort", *args[:1], "--url", archive.root,
         *args[1:]], capture_output=True, text=True, timeout=300, **kwargs)


def test_cli_download_resumes_across_a_restart_and_checks_every_file(make_archive, tmp_path):
    # one server process: killing it ends every connection (a worker would finish its own)
    archive = make_archive("restart", "[server]\nprocesses = 1\n" + CONFIG)
    corpus = PhiCorpus(seed=5, out_dir=tmp_path / "corpus")
    files = corpus.study(corpus.patient(), dt.date(2021, 2, 2), slices=24, size=16)
    noise = random.Random(5)
    for path in files:  # 512 x 512 slices: 12 MB, more than the sockets' buffers hold
        ds = pydicom.dcmread(path)
        ds.Rows = ds.Columns = 512
        ds.PixelData = noise.randbytes(512 * 512 * 2)
        ds.save_as(path)
    assert dcmtk.storescu(archive.dimse_port, files).returncode == 0
    created = cli(archive, "create", "--name", "big-ct", "--filter", "Modality=CT",
                  "--license", "CC0")
    assert created.returncode == 0, created.stderr
    cohort = json.loads(created.stdout)
    assert cohort["counts"]["instances"] == 24
    listed = cli(archive, "list")
    assert f"{cohort['id']}\tbig-ct\t1\t1\t24\t{cohort['bytes']}" in listed.stdout

    out = tmp_path / "big-ct.zip"
    part = tmp_path / "big-ct.zip.part"
    size = requests.get(f"{api(archive)}/{cohort['id']}/files", timeout=30).json()[
        "archive"]["size"]
    log = (tmp_path / "download.log").open("w")
    download = subprocess.Popen(
        [sys.executable, "-m", "ricord_archive", "cohort", "download", "--url", archive.root,
         str(cohort["id"]), str(out), "--limit-rate", str(size // 8)],
        stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (part.exists() and part.stat().st_size > size // 3):
        assert download.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)  # polling the partial file's size
    archive.kill()  # the archive goes away mid-download, and comes back
    archive.start()
    assert download.wait(timeout=300) == 0, (tmp_path / "download.log").read_text()
    output = (tmp_path / "download.log").read_text()
    assert "interrupted" in output and "every file matches" in output
    assert not part.exists()

    with zipfile.ZipFile(out) as zipped:
        assert zipped.testzip() is None
        names = [n for n in zipped.namelist() if n.endswith(".dcm")]
        study, series = names[0].split("/")[1:3]
        assert [zipped.read(n) for n in names] == stored_bytes(archive, study, series)
        assert zipped.read("LICENSE.txt") == b"CC0"
    resumed = [e for e in audit_events(archive, "--limit", "1000")
               if e["resource"] == "/api/cohorts/{id}/archive.zip"]
    assert any(e["detail"]["status"] == 206 and e["detail"]["bytes"] < size for e in resumed)

    # a partial download spoiled on disk is caught by the check, not handed out
    spoiled = bytearray(out.read_bytes()[: size * 9 // 10])
    spoiled[size // 2] ^= 0xFF
    part.write_bytes(bytes(spoiled))
    listing = requests.get(f"{api(archive)}/{cohort['id']}/files", timeout=30).json()
    (tmp_path / "big-ct.zip.part.json").write_text(json.dumps(listing["archive"]))
    out.unlink()
    again = cli(archive, "download", str(cohort["id"]), str(out))
    assert again.returncode == 2
    assert "do not match" in again.stderr and not out.exists()


def test_an_object_replaced_after_the_freeze_makes_the_cohort_gone(make_archive, tmp_path):
    """With the `overwrite` duplicate policy a re-sent object replaces the stored one (and its
    bytes): the frozen cohort can no longer be served as frozen, and says so before any byte."""
    archive = make_archive("overwrite", "[ingest]\nduplicates = \"overwrite\"\n" + CONFIG)
    corpus = PhiCorpus(seed=9, out_dir=tmp_path / "corpus")
    files = corpus.study(corpus.patient(), dt.date(2021, 7, 7), slices=2)
    assert dcmtk.storescu(archive.dimse_port, files).returncode == 0
    cohort = create(archive, {"Modality": "CT"}, name="replaced")
    base = f"{api(archive)}/{cohort['id']}"
    assert requests.get(f"{base}/archive.zip", timeout=30).status_code == 200
    changed = pydicom.dcmread(files[0])
    changed.PixelData = bytes(len(changed.PixelData))
    changed.save_as(files[0])
    assert dcmtk.storescu(archive.dimse_port, files[:1]).returncode == 0
    for name in ("archive.zip", "files"):
        response = requests.get(f"{base}/{name}", timeout=30)
        assert response.status_code == 410
        assert "replaced" in response.json()["error"]
