"""GET /metrics: Prometheus counters move with the traffic sent (C-STORE by DCMTK, STOW-RS,
QIDO-RS, WADO-RS, refusals, a rejected association), summed over the server processes, and
no label value is a UID or a planted PHI value."""

from __future__ import annotations

import datetime as dt
import os
import re
import time
import uuid
from collections.abc import Callable

import pydicom
import pytest
import requests
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from ricord_archive.errors import (
    DuplicateRefused,
    InvalidObject,
    RefusedObject,
    StorageUnavailable,
)
from ricord_archive.runtime.metrics import outcome_of
from tests import dcmtk
from tests.conftest import free_port
from tests.scrape import Scrape, scrape

pytestmark = pytest.mark.slow  # a server process per test

CONFIG = """
[server]
processes = 2

[[sites]]
name = "hospital-a"
aets = ["PACS_A"]
default = true

[limits]
orphan_collect_interval = 1
"""
_UID = re.compile(r"[0-9]+(\.[0-9]+){2,}")
DEADLINE = 30.0


def _until(url: str, name: str, wanted: Callable[[float], bool]) -> Scrape:
    """Scrape until the value of `name` is as `wanted` (gauges are sampled every second)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        found = scrape(url)
        if wanted(found.value(name)):
            return found
        assert time.monotonic() < deadline, f"{name} still {found.value(name)}"
        time.sleep(0.2)  # polling interval, not a wait for an outcome


def _burned_in(path, out):
    dataset = pydicom.dcmread(path)
    dataset.BurnedInAnnotation = "YES"
    dataset.save_as(out, enforce_file_format=True)
    return out


def test_counters_follow_the_traffic(make_archive, corpus, tmp_path):
    archive = make_archive("metrics", CONFIG)
    url = f"{archive.root}/metrics"
    before = scrape(url)
    ingest = "ricord_ingest_objects_total"

    def delta(name: str, **labels: str) -> float:
        return scrape(url).value(name, **labels) - before.value(name, **labels)

    # C-STORE from DCMTK: three stored, one re-sent (duplicate), one refused
    patient = corpus.patient()
    dimse_files = corpus.study(patient, dt.date(2021, 5, 1), slices=3)
    for path in dimse_files:  # an association each: the kernel spreads them over the processes
        assert "(Success)" in dcmtk.storescu(archive.dimse_port, [path], "PACS_A").stderr
    assert "(Success)" in dcmtk.storescu(archive.dimse_port, dimse_files[:1], "PACS_A").stderr
    refused = _burned_in(dimse_files[0], tmp_path / "burned.dcm")
    assert "Status: 0x124" in dcmtk.storescu(archive.dimse_port, [refused], "PACS_A").stderr
    # STOW-RS: two stored, one refused
    stow_files = corpus.study(patient, dt.date(2021, 6, 1), slices=2)
    archive.client().store_instances([pydicom.dcmread(p) for p in stow_files])
    stow_refused = _burned_in(stow_files[0], tmp_path / "burned-stow.dcm")
    body = (b"--b\r\nContent-Type: application/dicom\r\n\r\n" + stow_refused.read_bytes()
            + b"\r\n--b--\r\n")
    answer = requests.post(f"{archive.dicomweb_url}/studies", data=body, timeout=60, headers={
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=b'})
    assert answer.status_code == 409
    # a calling AE title no site lists: A-ASSOCIATE-RJ
    assert dcmtk.echoscu(archive.dimse_port, "INTRUDER").returncode != 0
    # QIDO-RS and WADO-RS, each request on a connection of its own
    studies = requests.get(f"{archive.dicomweb_url}/studies", timeout=30)
    assert studies.status_code == 200
    study_uids = [s["0020000D"]["Value"][0] for s in studies.json()]
    assert len(study_uids) == 2
    for uid in study_uids:
        assert requests.get(f"{archive.dicomweb_url}/studies/{uid}/series",
                            timeout=30).status_code == 200
        assert requests.get(f"{archive.dicomweb_url}/studies/{uid}/metadata",
                            timeout=30).status_code == 200
    missing = requests.get(f"{archive.dicomweb_url}/studies/1.2.3.999/metadata", timeout=30)
    assert missing.status_code == 404
    unknown = requests.get(f"{archive.dicomweb_url}/no-such-resource", timeout=30)
    assert unknown.status_code == 404
    request_ids = {r.headers["X-Request-ID"] for r in (studies, missing, unknown, answer)}
    assert len(request_ids) == 4 and all(re.fullmatch(r"[0-9a-f]{16}", i) for i in request_ids)

    site = {"site": "hospital-a"}
    assert delta(ingest, protocol="c_store", outcome="stored", **site) == 3
    assert delta(ingest, protocol="c_store", outcome="duplicate", **site) == 1
    assert delta(ingest, protocol="c_store", outcome="refused_burned_in_annotation", **site) == 1
    assert delta(ingest, protocol="stow_rs", outcome="stored", **site) == 2
    assert delta(ingest, protocol="stow_rs", outcome="refused_burned_in_annotation", **site) == 1
    assert delta("ricord_ingest_duration_seconds_count", protocol="c_store") == 5
    assert delta("ricord_ingest_duration_seconds_count", protocol="stow_rs") == 3
    stored_bytes = delta("ricord_ingest_stored_bytes_total", **site)
    assert stored_bytes > sum(p.stat().st_size for p in dimse_files + stow_files) / 2
    assert delta("ricord_dimse_associations_rejected_total",
                 reason="calling_ae_title_not_recognised") == 1
    assert delta("ricord_dimse_associations_total") == 5
    http = "ricord_http_requests_total"
    assert delta(http, service="qido", route="/dicom-web/studies", method="GET",
                 status="200") == 1
    assert delta(http, service="qido", route="/dicom-web/studies/{study}/series",
                 status="200") == 2
    assert delta(http, service="wado", route="/dicom-web/studies/{study}/metadata",
                 status="200") == 2
    assert delta(http, service="wado", route="/dicom-web/studies/{study}/metadata",
                 status="404") == 1
    assert delta(http, service="stow", route="/dicom-web/studies", method="POST",
                 status="200") == 1
    assert delta(http, service="stow", route="/dicom-web/studies", status="409") == 1
    assert delta(http, service="unmatched", route="unmatched", status="404") == 1
    assert delta("ricord_http_request_duration_seconds_count", service="wado",
                 route="/dicom-web/studies/{study}/metadata") == 3
    assert delta("ricord_http_request_duration_seconds_count", service="wado",
                 route="/dicom-web/studies/{study}/metadata", status="404") == 1

    final = scrape(url)
    # both processes write to the shared directory: their pools (10 connections each) add up
    assert final.value("ricord_db_pool_max_connections") == 20
    assert final.names() >= {
        "ricord_db_pool_connections", "ricord_db_pool_waits_total",
        "ricord_db_pool_wait_duration_seconds_count", "ricord_blob_store_errors_total",
        "ricord_audit_events_buffered", "ricord_audit_events_dropped_total",
        "ricord_read_replica_in_use", "ricord_read_replica_fallbacks_total",
        "ricord_orphan_collector_runs_total", "ricord_orphan_collector_removed_blobs_total",
        "ricord_dimse_associations_open",
    }
    for value in final.label_values():
        assert not _UID.fullmatch(value), f"a UID as a label value: {value}"
    for secret in [*corpus.corpus.planted, *study_uids, "1.2.3.999", "INTRUDER", "PACS_A"]:
        assert secret not in final.text


def test_open_associations_and_the_orphan_collector(make_archive, corpus):
    archive = make_archive("metrics-gauges", CONFIG)
    url = f"{archive.root}/metrics"
    ae = AE(ae_title="PACS_A")
    ae.add_requested_context(Verification)
    association = ae.associate("127.0.0.1", archive.dimse_port, ae_title="RICORD")
    assert association.is_established
    try:
        _until(url, "ricord_dimse_associations_open", lambda open_: open_ == 1)
    finally:
        association.release()
    _until(url, "ricord_dimse_associations_open", lambda open_: open_ == 0)

    # an orphan blob (a crash between its write and its index row), older than the grace
    orphan = archive.data_dir / "blobs" / "ab" / "cd" / f"{uuid.uuid4().hex}.dcm"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"not indexed")
    old = time.time() - 2 * 3600
    os.utime(orphan, (old, old))
    found = _until(url, "ricord_orphan_collector_removed_blobs_total", lambda n: n >= 1)
    assert not orphan.exists()
    assert found.value("ricord_orphan_collector_runs_total", result="completed") >= 1


def test_metrics_on_a_port_of_their_own(make_archive):
    port = free_port()
    archive = make_archive("metrics-port", f"[metrics]\nport = {port}\n")
    assert requests.get(f"{archive.root}/metrics", timeout=30).status_code == 404
    found = scrape(f"http://127.0.0.1:{port}/metrics")
    assert found.value("ricord_ingest_objects_total", protocol="stow_rs", site="default",
                       outcome="stored") == 0  # there from the start, at zero
    assert found.value("ricord_db_pool_max_connections") > 0


def test_ingest_outcomes_are_a_small_fixed_vocabulary():
    assert outcome_of(RefusedObject("PatientID DOE-1 missing", "no-patient-id")) \
        == "refused_no_patient_id"  # the reason code, never the message
    assert outcome_of(RefusedObject("x", "1.2.840.10008.5.1")) == "refused_other"
    assert outcome_of(DuplicateRefused("x")) == "refused_duplicate_conflict"
    assert outcome_of(InvalidObject("x")) == "refused_invalid_object"
    assert outcome_of(StorageUnavailable("x")) == "failed"
    assert outcome_of(RuntimeError("PATIENT NAME")) == "failed"
