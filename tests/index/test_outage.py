"""The database goes away mid-service: ingest fails promptly and cleanly, then recovers."""

from __future__ import annotations

import datetime as dt

import pydicom
import requests

from ricord_archive.blobstore import FileBlobStore
from ricord_archive.index.embedded import EmbeddedPostgres
from tests import dcmtk
from tests.scrape import scrape


def test_database_outage_fails_promptly_and_recovers(make_archive, corpus):
    archive = make_archive()
    first, second, third = corpus.study(corpus.patient(), dt.date(2020, 7, 7), slices=3)
    assert "(Success)" in dcmtk.storescu(archive.dimse_port, [first]).stderr
    database = EmbeddedPostgres(archive.data_dir / "pg")
    database.stop()  # PostgreSQL stopped under the running archive

    refused = dcmtk.storescu(archive.dimse_port, [second]).stderr
    assert "Received Store Response (Refused: OutOfResources" in refused
    answer = requests.post(
        f"{archive.dicomweb_url}/studies",
        data=b"--b\r\nContent-Type: application/dicom\r\n\r\n" + third.read_bytes()
        + b"\r\n--b--\r\n",
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
        timeout=60,
    )
    assert answer.status_code == 503
    assert requests.get(f"{archive.dicomweb_url}/studies", timeout=60).status_code == 503
    failed = scrape(f"{archive.root}/metrics")  # counted as failed: may be sent again
    for protocol in ("c_store", "stow_rs"):
        assert failed.value("ricord_ingest_objects_total", protocol=protocol,
                            outcome="failed") == 1
    assert failed.value("ricord_http_requests_total", service="qido", status="503") == 1
    blobs = FileBlobStore(archive.data_dir / "blobs")
    assert len(list(blobs.walk())) == 1  # nothing half-written

    database.start()  # PostgreSQL is back: the archive resumes on its own
    assert "(Success)" in dcmtk.storescu(archive.dimse_port, [second, third]).stderr
    archive.client().store_instances([pydicom.dcmread(third)])
    [study] = archive.client().search_for_studies()
    assert study["00201208"]["Value"] == [3]
    assert len(list(blobs.walk())) == 3
