"""The archive end to end: DCMTK and dicomweb-client against the real server process."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys

import pydicom
import pytest
import requests

from ricord_archive.blobstore import FileBlobStore
from tests import dcmtk
from tests.conftest import Archive

pytestmark = pytest.mark.slow  # a server process per test, DCMTK

SITES_CONFIG = """
[[sites]]
name = "site-a"
aets = ["PACS_A"]
default = true

[[sites]]
name = "site-b"
aets = ["PACS_B"]
siteid = "654321"
"""


def studies(archive: Archive, **filters: str) -> list[dict]:
    return archive.client().search_for_studies(search_filters=filters)


def value(document: dict, tag: str):
    return document[tag]["Value"][0]


def blob_files(archive: Archive) -> list[str]:
    """The keys of the blobs on disk (deleted ones are not listed)."""
    return [key for key, _, _ in FileBlobStore(archive.data_dir / "blobs").walk()]


def test_echo_store_and_find_with_dcmtk(make_archive, corpus, tmp_path):
    archive = make_archive()
    assert dcmtk.echoscu(archive.dimse_port).returncode == 0
    patient = corpus.patient()
    files = corpus.study(patient, dt.date(2021, 3, 4), slices=4)
    sent = dcmtk.storescu(archive.dimse_port, files)
    assert sent.returncode == 0, sent.stderr
    assert sent.stderr.count("Received Store Response (Success)") == 4

    found = dcmtk.findscu(archive.dimse_port, tmp_path / "find", {
        "PatientID": "", "PatientName": "", "StudyDate": "", "StudyInstanceUID": "",
        "ModalitiesInStudy": "", "NumberOfStudyRelatedInstances": "", "AccessionNumber": "",
    })
    assert len(found) == 1
    study = found[0]
    pseudonym = str(study.PatientID)
    assert re.fullmatch(r"[1-9]\d{5}-000001", pseudonym)
    assert str(study.PatientName) == pseudonym
    assert study.ModalitiesInStudy == "CT"
    assert int(study.NumberOfStudyRelatedInstances) == 4
    assert study.StudyInstanceUID.startswith("2.25.")
    assert study.StudyDate != "20210304"
    assert len(study.AccessionNumber) == 16

    siteid = pseudonym.split("-")[0]
    for keys in (
        {"PatientID": pseudonym},
        {"PatientName": f"{siteid}-*"},
        {"PatientName": f"{siteid}-00000?"},
        {"StudyDate": study.StudyDate},
        {"StudyDate": f"{study.StudyDate}-"},
        {"StudyDate": f"-{study.StudyDate}"},
        {"StudyInstanceUID": study.StudyInstanceUID},
        {"AccessionNumber": study.AccessionNumber},
        {"ModalitiesInStudy": "CT"},
    ):
        matches = dcmtk.findscu(archive.dimse_port, tmp_path / "find", {**keys, "PatientID": ""})
        assert [str(m.PatientID) for m in matches] == [pseudonym], keys
    for keys in (
        {"PatientID": f"{siteid}-000002"},
        {"PatientName": "NOBODY*"},
        {"StudyDate": "19000101-19000102"},
        {"ModalitiesInStudy": "MR"},
        {"AccessionNumber": patient.patient_id},
    ):
        assert dcmtk.findscu(archive.dimse_port, tmp_path / "find", keys) == [], keys


def test_stow_qido_wado_with_dicomweb_client(make_archive, corpus):
    archive = make_archive()
    client = archive.client()
    patient = corpus.patient()
    files = corpus.study(patient, dt.date(2022, 5, 6), slices=3)
    originals = [pydicom.dcmread(f) for f in files]
    stored = client.store_instances(originals)
    references = stored.ReferencedSOPSequence
    assert len(references) == 3
    assert "FailedSOPSequence" not in stored

    [study] = studies(archive)
    study_uid = value(study, "0020000D")
    assert value(study, "00201208") == 3
    assert value(study, "00201206") == 1
    assert study["00080061"]["Value"] == ["CT"]
    assert value(study, "00081190") == f"{archive.dicomweb_url}/studies/{study_uid}"
    assert studies(archive, PatientName=value(study, "00100020")[:7] + "*") == [study]
    assert studies(archive, StudyDate="19000101-19000102") == []
    assert [value(s, "0020000D") for s in studies(archive, StudyInstanceUID=study_uid)] == [
        study_uid
    ]

    retrieved = client.retrieve_study(study_uid)
    assert len(retrieved) == 3
    by_number = {int(ds.InstanceNumber): ds for ds in retrieved}
    for original in originals:
        copy = by_number[int(original.InstanceNumber)]
        assert copy.PixelData == original.PixelData
        assert copy.SOPInstanceUID != original.SOPInstanceUID
        assert copy.file_meta.MediaStorageSOPInstanceUID == copy.SOPInstanceUID
        assert copy.PatientID == value(study, "00100020")
        assert copy.PatientIdentityRemoved == "YES"
        assert "SourceApplicationEntityTitle" not in copy.file_meta
        assert copy.preamble == b"\x00" * 128

    one = retrieved[0]
    single = client.retrieve_instance(study_uid, one.SeriesInstanceUID, one.SOPInstanceUID)
    assert single.SOPInstanceUID == one.SOPInstanceUID
    metadata = client.retrieve_series_metadata(study_uid, one.SeriesInstanceUID)
    assert len(metadata) == 3
    assert all("BulkDataURI" in m["7FE00010"] for m in metadata)
    pixels = client.retrieve_bulkdata(archive.root + metadata[0]["7FE00010"]["BulkDataURI"])
    assert pixels == [by_number[int(value(metadata[0], "00200013"))].PixelData]
    instance_md = client.retrieve_instance_metadata(
        study_uid, one.SeriesInstanceUID, one.SOPInstanceUID
    )
    assert value(instance_md, "00080018") == one.SOPInstanceUID
    assert len(client.retrieve_study_metadata(study_uid)) == 3


def test_http_errors_and_headers(make_archive, corpus):
    archive = make_archive()
    url = archive.dicomweb_url
    assert requests.get(f"{url}/studies").json() == []
    missing = "2.25.1234"
    assert requests.get(f"{url}/studies/{missing}").status_code == 404
    assert requests.get(f"{url}/studies/{missing}/metadata").status_code == 404
    assert requests.get(f"{url}/studies", params={"StudyDate": "yesterday"}).status_code == 400
    unknown = requests.get(f"{url}/studies", params={"NotAKey": "1"})
    assert unknown.status_code == 200 and "NotAKey" in unknown.headers["Warning"]
    assert requests.get(f"{url}/studies", headers={"Accept": "image/png"}).status_code == 406
    ignored = requests.get(f"{url}/studies", params={"BodyPartExamined": "CHEST"})
    assert ignored.status_code == 200 and "BodyPartExamined" in ignored.headers["Warning"]

    wrong_type = requests.post(f"{url}/studies", data=b"x", headers={"Content-Type": "text/plain"})
    assert wrong_type.status_code == 415
    garbage = requests.post(f"{url}/studies", data=b"not multipart", headers={
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=xyz'})
    assert garbage.status_code == 400


def _multipart(parts: list[bytes], boundary: str = "b0undary") -> tuple[bytes, dict]:
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
        for p in parts
    ) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f'multipart/related; type=application/dicom; boundary={boundary}'}


def test_stow_status_codes(make_archive, corpus, tmp_path):
    archive = make_archive()
    url = f"{archive.dicomweb_url}/studies"
    good, other = corpus.study(corpus.patient(), dt.date(2020, 1, 2), slices=2)
    no_patient = pydicom.dcmread(other)
    del no_patient.PatientID
    no_patient_path = tmp_path / "no-patient.dcm"
    no_patient.save_as(no_patient_path)

    body, headers = _multipart([good.read_bytes()])
    ok = requests.post(url, data=body, headers=headers)
    assert ok.status_code == 200
    assert ok.headers["Content-Type"] == "application/dicom+json"

    body, headers = _multipart([no_patient_path.read_bytes(), b"garbage"])
    failed = requests.post(url, data=body, headers=headers)
    assert failed.status_code == 409
    reasons = [item["00081197"]["Value"][0] for item in failed.json()["00081198"]["Value"]]
    assert reasons == [0xC000, 0xC000]

    body, headers = _multipart([good.read_bytes(), b"garbage"])
    mixed = requests.post(url, data=body, headers=headers)
    assert mixed.status_code == 202
    assert len(mixed.json()["00081199"]["Value"]) == 1

    body, headers = _multipart([other.read_bytes()])
    wrong_study = requests.post(f"{url}/2.25.999", data=body, headers=headers)
    assert wrong_study.status_code == 409
    assert wrong_study.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]
    original_study = pydicom.dcmread(other).StudyInstanceUID
    right_study = requests.post(f"{url}/{original_study}", data=body, headers=headers)
    assert right_study.status_code == 200

    [study] = studies(archive)
    assert value(study, "00201208") == 2  # the re-sent object was stored once
    assert len(blob_files(archive)) == 2


def test_resend_keeps_one_row_and_one_blob(make_archive, corpus):
    archive = make_archive()
    files = corpus.study(corpus.patient(), dt.date(2020, 6, 1), slices=2)
    for _ in range(2):
        assert dcmtk.storescu(archive.dimse_port, files).returncode == 0
        archive.client().store_instances([pydicom.dcmread(f) for f in files])
    [study] = studies(archive)
    assert value(study, "00201208") == 2
    assert len(blob_files(archive)) == 2


def test_refused_objects_leave_no_blob(make_archive, corpus, tmp_path):
    archive = make_archive()
    first = corpus.patient()
    [original] = corpus.study(first, dt.date(2020, 6, 1), slices=1)
    assert dcmtk.storescu(archive.dimse_port, [original]).returncode == 0
    # the same study UID under another patient: refused by the index after the blob was written
    hijack = pydicom.dcmread(original)
    hijack.PatientID = "SOMEONE-ELSE-1"
    hijack.SOPInstanceUID = hijack.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7"
    hijack_path = tmp_path / "hijack.dcm"
    hijack.save_as(hijack_path)
    no_id = pydicom.dcmread(original)
    del no_id.PatientID
    no_id.SOPInstanceUID = no_id.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.8"
    no_id_path = tmp_path / "no-id.dcm"
    no_id.save_as(no_id_path)
    for path in (hijack_path, no_id_path):
        result = dcmtk.storescu(archive.dimse_port, [path])
        assert "Received Store Response (Success)" not in result.stderr
        assert "Received Store Response (Error: CannotUnderstand)" in result.stderr
    [study] = studies(archive)
    assert value(study, "00201208") == 1
    assert len(blob_files(archive)) == 1
    assert list((archive.data_dir / "blobs" / "tmp").iterdir()) == []


def test_sites_longitudinal_and_restart(make_archive, corpus):
    archive = make_archive("sites", SITES_CONFIG)
    patient = corpus.patient()
    first = corpus.study(patient, dt.date(2020, 3, 1), slices=2)
    second = corpus.study(patient, dt.date(2020, 3, 15), slices=2)
    assert dcmtk.storescu(archive.dimse_port, first, calling="PACS_A").returncode == 0
    assert archive.stop() == 0
    archive.start()
    assert dcmtk.storescu(archive.dimse_port, second, calling="PACS_A").returncode == 0
    assert dcmtk.storescu(archive.dimse_port, first, calling="PACS_B").returncode == 0

    found = studies(archive)
    at_a = [s for s in found if value(s, "00120030") != "654321"]
    at_b = [s for s in found if value(s, "00120030") == "654321"]
    assert len(at_a) == 2 and len(at_b) == 1
    pseudonyms = {value(s, "00100020") for s in at_a}
    assert len(pseudonyms) == 1
    (pseudonym,) = pseudonyms
    assert pseudonym.endswith("-000001")
    assert value(at_b[0], "00100020") == "654321-000001"
    assert value(at_b[0], "0020000D") not in {value(s, "0020000D") for s in at_a}
    dates = sorted(dt.datetime.strptime(value(s, "00080020"), "%Y%m%d").date() for s in at_a)
    assert dates[1] - dates[0] == dt.timedelta(days=14)
    assert dates[0] != dt.date(2020, 3, 1)
    b_date = dt.datetime.strptime(value(at_b[0], "00080020"), "%Y%m%d").date()
    assert b_date != dates[0]  # another site: its own, unrelated date offset (1 in 3650 flake)

    rejected = dcmtk.echoscu(archive.dimse_port, calling="STRANGER")
    assert rejected.returncode != 0
    assert "STRANGER" in archive.log() and "rejected" in archive.log()


def test_crash_recovery_and_clean_stop(make_archive, corpus):
    archive = make_archive()
    files = corpus.study(corpus.patient(), dt.date(2020, 1, 1), slices=2)
    assert dcmtk.storescu(archive.dimse_port, files).returncode == 0
    archive.kill()  # SIGKILL: the embedded PostgreSQL is left running
    archive.start()
    [study] = studies(archive)
    assert value(study, "00201208") == 2
    assert archive.stop() == 0
    assert not (archive.data_dir / "pg" / "data" / "postmaster.pid").exists(), archive.log()
    # and after PostgreSQL itself was killed with the archive (stale postmaster.pid)
    archive.start()
    pid = int((archive.data_dir / "pg" / "data" / "postmaster.pid").read_text().split()[0])
    archive.kill()
    subprocess.run(["kill", "-9", str(pid)], check=True)
    archive.start()
    [study] = studies(archive)
    assert value(study, "00201208") == 2


def test_db_url_and_migrate_checksum(make_archive, corpus):
    archive = make_archive()
    url = subprocess.run(archive.command("db-url"), capture_output=True, text=True, check=True)
    dsn = url.stdout.strip()
    assert dsn.startswith("postgresql://")
    check = subprocess.run(
        [sys.executable, "-c", f"""
import asyncio, asyncpg
async def main():
    conn = await asyncpg.connect({dsn!r})
    print(await conn.fetchval("SELECT count(*) FROM schema_migration"))
    await conn.execute("UPDATE schema_migration SET checksum = 'edited' WHERE version = 1")
    await conn.close()
asyncio.run(main())
"""], capture_output=True, text=True, check=True)
    assert int(check.stdout) >= 1
    archive.stop()
    migrate = subprocess.run(archive.command("migrate"), capture_output=True, text=True)
    assert migrate.returncode == 2
    assert "was changed after it was applied" in migrate.stderr
    stopped = subprocess.run(archive.command("db-url"), capture_output=True, text=True)
    assert stopped.returncode == 1  # migrate stopped the PostgreSQL it started


@pytest.mark.parametrize(("name", "propose"), [
    ("CT_small.dcm", "-xe"),
    ("MR_small_implicit.dcm", "-xi"),
    ("693_J2KI.dcm", "-xw"),
    ("MR_small_jp2klossless.dcm", "-xv"),
    ("MR_small_jpeg_ls_lossless.dcm", "-xt"),
])
def test_compressed_and_real_world_files_over_dimse(make_archive, name, propose, tmp_path):
    """Objects are stored in the transfer syntax they arrive in, pixel data untouched."""
    from pydicom.data import get_testdata_file

    archive = make_archive()
    source = pydicom.dcmread(get_testdata_file(name))
    path = tmp_path / name
    source.save_as(path)
    result = dcmtk.run(
        "storescu", "-v", propose, "-aec", "RICORD", "127.0.0.1", str(archive.dimse_port),
        str(path),
    )
    assert "Received Store Response (Success)" in result.stderr, result.stderr
    assert not re.search(r"Converting transfer syntax: (.*) -> (?!\1$)", result.stderr, re.M)
    [study] = studies(archive)
    [stored] = archive.client().retrieve_study(
        value(study, "0020000D"), media_types=(("application/dicom", "*"),)
    )
    assert stored.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
    assert stored.PixelData == source.PixelData


def test_ingest_in_worker_processes(make_archive, corpus, tmp_path):
    """The same pipeline with de-identification in worker processes: results, refusals and
    invalid objects cross the process boundary intact."""
    archive = make_archive("workers", "[server]\ningest_workers = 2\n")
    files = corpus.study(corpus.patient(), dt.date(2020, 5, 5), slices=3)
    assert dcmtk.storescu(archive.dimse_port, files[:2]).stderr.count("(Success)") == 2
    refused = pydicom.dcmread(files[2])
    refused.BurnedInAnnotation = "YES"
    answer = archive.client().store_instances([pydicom.dcmread(files[0]), refused])
    assert [item.FailureReason for item in answer.FailedSOPSequence] == [0x0124]
    assert len(answer.ReferencedSOPSequence) == 1
    body, headers = _multipart([b"not dicom"])
    garbage = requests.post(f"{archive.dicomweb_url}/studies", data=body, headers=headers)
    assert garbage.status_code == 409
    [study] = studies(archive)
    assert value(study, "00201208") == 2
    assert len(blob_files(archive)) == 2
