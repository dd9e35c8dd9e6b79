"""Blobs in a real S3 server (SeaweedFS): one archive on it, and two archive nodes on one
PostgreSQL and one bucket."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import io
import shutil
import subprocess
import time
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import obstore
import pydicom
import pytest
import requests
from obstore.store import S3Store

from tests import dcmtk
from tests.conftest import DCMTK_ENV, Archive
from tests.seaweed import Seaweed

pytestmark = pytest.mark.slow  # SeaweedFS as the S3 store, archives per test

SECRET = "two-nodes-share-this-secret-key-0123456789"


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory):
    server = Seaweed(tmp_path_factory.mktemp("seaweed")).start()
    yield server
    server.stop()


@pytest.fixture
def bucket(seaweed) -> str:
    name = f"ricord-{uuid.uuid4().hex[:12]}"
    seaweed.create_bucket(name)
    return name


def s3_config(seaweed: Seaweed, bucket: str, extra: str = "") -> str:
    """Settings of an archive on the bucket (tables may follow: [s3] is not the last)."""
    return (f'[server]\nsecret_key = "{SECRET}"\n{extra}\n'
            f'[s3]\nbucket = "{bucket}"\nendpoint = "{seaweed.endpoint}"\nprefix = "archive"\n'
            'access_key_id = "test"\nsecret_access_key = "test"\n\n')


def objects(seaweed: Seaweed, bucket: str) -> dict[str, int]:
    store = S3Store(bucket, config={"endpoint": seaweed.endpoint, "access_key_id": "test",
                                    "secret_access_key": "test", "region": "us-east-1",
                                    "virtual_hosted_style_request": False},
                    client_options={"allow_http": True})
    return {meta["path"]: meta["size"] for batch in obstore.list(store) for meta in batch}


def index_rows(archive: Archive) -> dict[str, tuple[str, int, bytes]]:
    """sop_uid -> (blob key, size, sha256) as the index holds them."""
    url = subprocess.run(archive.command("db-url"), capture_output=True, text=True,
                         check=True).stdout.strip()

    async def fetch() -> list:
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetch("SELECT sop_uid, blob_key, size_bytes, sha256 FROM instance")
        finally:
            await conn.close()

    return {r["sop_uid"]: (r["blob_key"], r["size_bytes"], r["sha256"])
            for r in asyncio.run(fetch())}


def test_an_archive_on_s3_stores_and_serves_everything_from_the_bucket(
    make_archive, corpus, seaweed, bucket
):
    archive = make_archive("s3", s3_config(seaweed, bucket))
    files = corpus.study(corpus.patient(), dt.date(2021, 3, 4), slices=5)
    assert dcmtk.storescu(archive.dimse_port, files[:3]).stderr.count("(Success)") == 3
    archive.client().store_instances([pydicom.dcmread(f) for f in files[3:]])
    ready = requests.get(f"{archive.root}/ready", timeout=60)
    assert ready.status_code == 200, ready.text  # its probe wrote to the bucket, and removed

    assert not list((archive.data_dir / "blobs").rglob("*.dcm"))  # nothing on local disk
    stored = objects(seaweed, bucket)
    rows = index_rows(archive)
    assert len(rows) == 5
    blobs = {path: size for path, size in stored.items() if path.endswith(".dcm")}
    assert {f"archive/{key}": size for key, size, _ in rows.values()} == blobs
    records = sorted(path.split("/")[2] for path in set(stored) - set(blobs))
    assert records == ["patients", "sites"]  # allocation records beside the blobs

    [study] = archive.client().search_for_studies()
    study_uid = study["0020000D"]["Value"][0]
    retrieved = requests.get(f"{archive.dicomweb_url}/studies/{study_uid}",
                             headers={"Accept": 'multipart/related; type="application/dicom"'},
                             timeout=60)
    assert retrieved.status_code == 200
    for instance in archive.client().retrieve_study(study_uid):
        _, size, digest = rows[instance.SOPInstanceUID]
        with_meta = requests.get(
            f"{archive.root}/wado", timeout=60,
            params={"requestType": "WADO", "studyUID": study_uid,
                    "seriesUID": instance.SeriesInstanceUID,
                    "objectUID": instance.SOPInstanceUID, "contentType": "application/dicom"},
        ).content
        assert len(with_meta) == size and hashlib.sha256(with_meta).digest() == digest
        [frame] = archive.client().retrieve_instance_frames(
            study_uid, instance.SeriesInstanceUID, instance.SOPInstanceUID, [1])
        assert frame == instance.PixelData  # read at its offset with a ranged GET
    rendered = requests.get(
        f"{archive.dicomweb_url}/studies/{study_uid}/series/{instance.SeriesInstanceUID}"
        f"/instances/{instance.SOPInstanceUID}/rendered", headers={"Accept": "image/png"},
        timeout=60)
    assert rendered.status_code == 200 and rendered.content[:4] == b"\x89PNG"

    fsck = subprocess.run(archive.command("fsck"), capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert "indexed instances: 5" in fsck.stdout

    assert archive.stop() == 0  # the index lost: rebuilt from the bucket alone
    shutil.rmtree(archive.data_dir / "pg")
    rebuilt = subprocess.run(archive.command("rebuild-index"), capture_output=True, text=True)
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert "indexed instances: 5" in rebuilt.stdout
    assert "patients without an allocation record: 0" in rebuilt.stdout
    archive.start()
    assert index_rows(archive) == rows


def test_two_nodes_on_one_database_and_one_bucket(make_archive, corpus, seaweed, bucket):
    first = make_archive("node-a", s3_config(seaweed, bucket)
                         + "[limits]\norphan_collect_interval = 1\norphan_grace = 10\n")
    url = subprocess.run(first.command("db-url"), capture_output=True, text=True,
                         check=True).stdout.strip()
    second = make_archive("node-b", s3_config(seaweed, bucket, f'database_url = "{url}"'))
    patient = corpus.patient()
    by_dimse = corpus.study(patient, dt.date(2021, 5, 6), slices=8)
    by_stow = corpus.study(patient, dt.date(2021, 6, 7), slices=8)

    with ThreadPoolExecutor(2) as senders:  # DIMSE on one node, STOW on the other, at once
        dimse = senders.submit(dcmtk.storescu, first.dimse_port, by_dimse)
        stow = senders.submit(second.client().store_instances,
                              [pydicom.dcmread(f) for f in by_stow])
        assert dimse.result().stderr.count("(Success)") == 8
        assert len(stow.result().ReferencedSOPSequence) == 8

    for node in (first, second):  # each node sees everything, the same way
        found = node.client().search_for_studies()
        assert sorted(s["00201208"]["Value"][0] for s in found) == [8, 8]
        assert len({s["00100020"]["Value"][0] for s in found}) == 1  # one pseudonym
        for study in found:
            uid = study["0020000D"]["Value"][0]
            assert len(node.client().retrieve_study(uid)) == 8
    blobs = [path for path in objects(seaweed, bucket) if path.endswith(".dcm")]
    assert len(blobs) == 16 == len(index_rows(first))

    # one node killed in the middle of an ingest: the other keeps serving
    more = corpus.study(patient, dt.date(2021, 7, 8), slices=30)
    log = first.log_path.parent / "killed-storescu.log"
    with log.open("w") as out:
        sender = subprocess.Popen(
            [dcmtk.tool("storescu"), "-v", "-aec", "RICORD", "127.0.0.1",
             str(second.dimse_port), *map(str, more)],
            stdout=out, stderr=subprocess.STDOUT, env=DCMTK_ENV)
    deadline = time.monotonic() + 60
    while "(Success)" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)  # polling for the first acknowledged object
    second.kill()
    sender.wait(timeout=60)
    acknowledged = log.read_text().count("Received Store Response (Success)")
    assert acknowledged >= 1
    counts = [s["00201208"]["Value"][0] for s in first.client().search_for_studies()]
    assert len(counts) == 3 and counts.count(8) >= 2
    assert sum(counts) - 16 >= acknowledged  # every acknowledged object is indexed
    assert dcmtk.storescu(first.dimse_port, more).stderr.count("(Success)") == 30
    assert sorted(s["00201208"]["Value"][0] for s in first.client().search_for_studies()) \
        == [8, 8, 30]
    rows = index_rows(first)
    assert len(rows) == 46
    indexed = {f"archive/{key}" for key, _, _ in rows.values()}

    def blobs_in_bucket() -> set[str]:
        return {path for path in objects(seaweed, bucket) if path.endswith(".dcm")}

    assert indexed <= blobs_in_bucket()  # no index row without its blob
    deadline = time.monotonic() + 90  # what the killed node wrote but never indexed is
    while blobs_in_bucket() != indexed and time.monotonic() < deadline:  # collected
        time.sleep(0.5)  # polling for the orphan collector's rounds
    assert blobs_in_bucket() == indexed


def test_a_cohort_zip_is_served_from_the_bucket_by_ranged_reads(
    make_archive, corpus, seaweed, bucket
):
    """Cohorts (issue #14) on an object store: each entry and each byte range of the ZIP read
    from the bucket by ranged GETs (no local file to sendfile from)."""
    archive = make_archive("s3-cohort", s3_config(seaweed, bucket))
    files = corpus.study(corpus.patient(), dt.date(2021, 3, 4), slices=3, size=64)
    assert dcmtk.storescu(archive.dimse_port, files).stderr.count("(Success)") == 3
    created = requests.post(f"{archive.root}/api/cohorts", timeout=60,
                            json={"name": "on-s3", "filters": {"Modality": "CT"}})
    assert created.status_code == 201, created.text
    url = f"{archive.root}/api/cohorts/{created.json()['id']}/archive.zip"
    whole = requests.get(url, timeout=60)
    assert whole.status_code == 200
    with zipfile.ZipFile(io.BytesIO(whole.content)) as zipped:
        assert zipped.testzip() is None
        stored = {hashlib.sha256(zipped.read(n)).digest() for n in zipped.namelist()
                  if n.endswith(".dcm")}
    assert stored == {sha for _, _, sha in index_rows(archive).values()}
    middle = len(whole.content) // 3
    part = requests.get(url, headers={"Range": f"bytes={middle}-{2 * middle}"}, timeout=60)
    assert part.status_code == 206 and part.content == whole.content[middle:2 * middle + 1]
