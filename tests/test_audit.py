"""The audit trail: PHI-free events (pure), the batching writer and the append-only table, and
end to end with real peers: what `ricord-archive audit` shows after C-STORE, STOW-RS, QIDO-RS,
C-FIND, C-GET, WADO, a rejected association and bad tokens, with no planted value anywhere."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import subprocess
from pathlib import Path
from typing import ClassVar

import asyncpg
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

from ricord_archive import audit_trail
from ricord_archive.config import ConfigError, load_config
from ricord_archive.errors import RefusedObject, StorageUnavailable
from ricord_archive.index.audit_rows import AuditRows, AuditWriter
from ricord_archive.search.model import Level
from ricord_archive.services.ingest import StoreResult
from tests import dcmtk
from tests.conftest import Archive, _stop_leftover_postgres
from tests.end_to_end.test_phi_leak import _hits, _needles

pytestmark = pytest.mark.slow  # a server process per test

ACTOR = audit_trail.Actor("PACS_A", "calling-ae", "site-a", "127.0.0.1")
TOKENS = {"upload": "tok-audit-upload-7c1d", "research": "tok-audit-research-90ab"}


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


CONFIG = f"""
[[sites]]
name = "site-a"
aets = ["STORESCU", "FINDSCU", "GETSCU"]
default = true

[auth]
enabled = true

[[auth.tokens]]
name = "upload"
sha256 = "{sha(TOKENS['upload'])}"
role = "uploader"
site = "site-a"

[[auth.tokens]]
name = "research"
sha256 = "{sha(TOKENS['research'])}"
role = "researcher"
"""


# --- the event model ----------------------------------------------------------------------

def test_query_keywords_name_attributes_never_values():
    params = [("PatientName", "DOE^JOHN"), ("00100020", "PID123456"), ("StudyDate", ""),
              ("AccessionNumber", "*"), ("limit", "5"), ("includefield", "PatientAge"),
              ("JOHNSMITH1234", "x"), ("ReferencedStudySequence.ReferencedSOPInstanceUID", "1.2")]
    assert audit_trail.query_keywords(params) == [
        "PatientID", "PatientName", "ReferencedStudySequence.ReferencedSOPInstanceUID", "unknown",
    ]


def test_stored_duplicate_and_refused_objects():
    new = StoreResult("2.25.1", "2.25.2", "2.25.3", "1.2.840.10008.5.1.4.1.1.2", False)
    again = StoreResult("2.25.1", "2.25.2", "2.25.3", "1.2.840.10008.5.1.4.1.1.2", True)
    other = StoreResult("2.25.1", "2.25.2", "2.25.3", "1.2.840.10008.5.1.4.1.1.2", True, 0xB006)
    created = audit_trail.instance_stored(ACTOR, "C-STORE", "site-a", new)
    assert (created.event_id, created.action, created.outcome) == (
        audit_trail.EventId.INSTANCES_TRANSFERRED, audit_trail.Action.CREATE,
        audit_trail.Outcome.SUCCESS)
    assert (created.study_uid, created.series_uid, created.sop_uid) == ("2.25.1", "2.25.2",
                                                                         "2.25.3")
    again_stored = audit_trail.instance_stored(ACTOR, "C-STORE", "site-a", again)
    assert again_stored.action is audit_trail.Action.READ
    kept = audit_trail.instance_stored(ACTOR, "STOW-RS", "site-a", other)
    assert kept.outcome is audit_trail.Outcome.MINOR_FAILURE
    assert kept.detail == {"stored": "duplicate-other-content-first-kept", "status": 0xB006}
    refusal = RefusedObject("PatientID DOE-123 missing", "no-patient-id")
    refusal.sop_uid = "2.25.9"
    refused = audit_trail.instance_refused(ACTOR, "C-STORE", "site-a", refusal)
    assert refused.outcome is audit_trail.Outcome.MINOR_FAILURE and refused.sop_uid == "2.25.9"
    assert refused.detail == {"reason": "no-patient-id", "status": 0xC000}  # not the message
    down = audit_trail.instance_refused(ACTOR, "STOW-RS", "site-a",
                                        StorageUnavailable("down"))
    assert down.outcome is audit_trail.Outcome.SERIOUS_FAILURE and down.detail["status"] == 0xA700
    crash = audit_trail.instance_refused(ACTOR, "STOW-RS", "site-a", KeyError("DOE^JOHN"))
    assert crash.outcome is audit_trail.Outcome.MAJOR_FAILURE
    assert crash.detail == {"reason": "KeyError"}


def test_querying_records_the_outcome_and_passes_errors_through():
    events: list[audit_trail.AuditEvent] = []

    class Trail:
        def record(self, event: audit_trail.AuditEvent) -> None:
            events.append(event)

    class Page:
        documents: ClassVar[list[dict]] = [{}, {}]

    async def found() -> Page:
        return Page()

    async def broken() -> Page:
        raise StorageUnavailable("the index is unavailable")

    params = [("PatientID", "PID-SECRET")]
    page = asyncio.run(audit_trail.querying(Trail(), ACTOR, "C-FIND", Level.STUDY, params, found()))
    assert isinstance(page, Page)
    with pytest.raises(StorageUnavailable):
        asyncio.run(audit_trail.querying(Trail(), ACTOR, "C-FIND", Level.STUDY, params, broken()))
    assert [(e.outcome, e.resource, dict(e.detail)) for e in events] == [
        (audit_trail.Outcome.SUCCESS, "STUDY", {"keys": ["PatientID"], "matches": 2}),
        (audit_trail.Outcome.SERIOUS_FAILURE, "STUDY",
         {"keys": ["PatientID"], "reason": "StorageUnavailable"}),
    ]


def test_a_full_buffer_drops_and_counts_instead_of_blocking():
    writer = AuditWriter(rows=None, capacity=3)  # type: ignore[arg-type]  # never flushed
    for _ in range(5):
        writer.record(audit_trail.association(ACTOR, True, {}))
    assert writer.dropped == 2


def test_audit_setting(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[server]\naudit = false\n")
    assert load_config(path, env={}).audit is False
    assert load_config(None, env={}).audit is True
    path.write_text('[server]\naudit = "no"\n')
    with pytest.raises(ConfigError, match="audit must be true or false"):
        load_config(path, env={})


# --- the table and the writer against PostgreSQL ----------------------------------------------

def _db_url(archive: Archive) -> str:
    result = subprocess.run(archive.command("db-url"), capture_output=True, text=True,
                            check=True)
    return result.stdout.strip()


def test_writer_batches_into_an_append_only_table(make_archive):
    archive = make_archive("audit-table", '[server]\naudit = false\n')
    url = _db_url(archive)

    async def main() -> None:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        try:
            writer = AuditWriter(AuditRows(pool), batch=10, interval=60)  # a full batch wakes it up
            writer.start()
            for number in range(10):
                writer.record(audit_trail.association(ACTOR, True, {"association": str(number)}))
            for _ in range(200):  # polling the table, at most 10 s
                if await pool.fetchval("SELECT count(*) FROM audit_event") == 10:
                    break
                await asyncio.sleep(0.05)
            assert await pool.fetchval("SELECT count(*) FROM audit_event") == 10
            writer.record(audit_trail.association(ACTOR, True, {"unencodable": object()}))
            await writer.flush()  # a batch that cannot be written is dropped, not retried
            assert writer.dropped == 1
            writer.record(audit_trail.association(ACTOR, False, {"ended": "aborted"}))
            await writer.stop()  # flushes what is left
            row = await pool.fetchrow("SELECT * FROM audit_event ORDER BY id DESC LIMIT 1")
            assert (row["event_id"], row["event_type"], row["action"], row["outcome"],
                    row["who"], row["source"]) == ("110108", "110125", "E", 4, "PACS_A",
                                                   "127.0.0.1")
            for statement in ("UPDATE audit_event SET who = 'x'", "DELETE FROM audit_event",
                              "TRUNCATE audit_event"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                    await pool.execute(statement)
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SET LOCAL ricord.audit_retention = 'on'")
                await conn.execute("DELETE FROM audit_event WHERE outcome = 4")
            assert await pool.fetchval("SELECT count(*) FROM audit_event") == 10
        finally:
            await pool.close()

    asyncio.run(main())


# --- end to end -----------------------------------------------------------------------------

def audit_events(archive: Archive, *args: str) -> list[dict]:
    result = subprocess.run(archive.command("audit", "--json", *args), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


def test_audit_trail_end_to_end(make_archive, corpus, tmp_path):
    archive = make_archive("audit", CONFIG)
    url = archive.dicomweb_url
    planted_patient = corpus.patient()
    dimse_files = corpus.study(planted_patient, dt.date(2021, 1, 10), slices=2)
    stow_files = corpus.study(corpus.patient(), dt.date(2021, 2, 10), slices=2)
    no_id = pydicom.dcmread(dimse_files[0])
    del no_id.PatientID
    no_id.SOPInstanceUID = no_id.file_meta.MediaStorageSOPInstanceUID = (
        corpus.corpus.plant(generate_uid()))
    no_id.save_as(tmp_path / "no-id.dcm")

    stored = dcmtk.storescu(archive.dimse_port, [*dimse_files, tmp_path / "no-id.dcm"])
    assert stored.stderr.count("(Success)") == 2, stored.stderr
    assert dcmtk.storescu(archive.dimse_port, dimse_files[:1]).returncode == 0  # a re-send
    uploader = DICOMwebClient(url, headers=bearer("upload"))
    stow = uploader.store_instances([pydicom.dcmread(f) for f in stow_files])
    stow_study = stow.RetrieveURL.rsplit("/", 1)[1]
    research = {"Accept": "application/dicom+json", **bearer("research")}
    listing = requests.get(f"{url}/studies", headers=research, timeout=30)
    assert listing.status_code == 200 and len(listing.json()) == 2
    by_name = requests.get(f"{url}/studies", headers=research, timeout=30, params={
        "PatientName": planted_patient.name, "includefield": "StudyDescription"})
    assert by_name.status_code == 200 and by_name.json() == []
    in_study = requests.get(f"{url}/studies/{stow_study}/series", headers=research, timeout=30)
    assert in_study.status_code == 200 and len(in_study.json()) == 1
    assert dcmtk.findscu(archive.dimse_port, tmp_path / "find", {
        "PatientID": planted_patient.patient_id, "PatientName": ""}) == []
    [study_uid] = {s["0020000D"]["Value"][0] for s in listing.json()} - {stow_study}
    wado = requests.get(f"{url}/studies/{study_uid}", timeout=30, headers={
        "Accept": 'multipart/related; type="application/dicom"', **bearer("research")})
    assert wado.status_code == 200
    original_uid = pydicom.dcmread(dimse_files[0]).StudyInstanceUID
    missing = requests.get(f"{url}/studies/{original_uid}/metadata", headers=research,
                           timeout=30)
    assert missing.status_code == 404
    got = dcmtk.run("getscu", "-S", "-aet", "GETSCU", "-aec", "RICORD", "-od",
                    str(tmp_path), "127.0.0.1", str(archive.dimse_port),
                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}")
    assert got.returncode == 0, got.stderr
    assert dcmtk.echoscu(archive.dimse_port, calling="INTRUDER").returncode != 0
    assert requests.get(f"{url}/studies", headers={"Authorization": "Bearer not-a-token"},
                        timeout=30).status_code == 401
    wado_uri = requests.get(f"{archive.root}/wado", timeout=30, params={
        "requestType": "WADO", "studyUID": original_uid, "seriesUID": original_uid,
        "objectUID": original_uid, "PatientName": planted_patient.name})
    assert wado_uri.status_code == 401
    assert requests.post(f"{url}/studies", headers=bearer("research"), data=b"",
                         timeout=30).status_code == 403
    assert archive.stop() == 0  # the writer flushes what it holds on the way out

    events = audit_events(archive, "--limit", "1000")
    kinds = [(e["event"], e["protocol"], e["outcome"]) for e in events]

    stores = [e for e in events if e["protocol"] == "C-STORE"]
    assert [(e["action"], e["outcome"], e["detail"].get("stored") or e["detail"]["reason"])
            for e in stores] == [("C", 0, "inserted"), ("C", 0, "inserted"),
                                 ("C", 4, "no-patient-id"), ("R", 0, "duplicate")]
    assert {(e["who"], e["role"], e["site"], e["source"]) for e in stores} == {
        ("STORESCU", "calling-ae", "site-a", "127.0.0.1")}
    assert {e["study_uid"] for e in stores[:2]} == {study_uid}
    assert stores[2]["sop_uid"].startswith("2.25.") and stores[2]["study_uid"] is None

    stows = [e for e in events if e["protocol"] == "STOW-RS"]
    assert [(e["event"], e["action"], e["outcome"], e["who"], e["role"], e["site"])
            for e in stows] == [("DICOM Instances Transferred", "C", 0, "upload", "uploader",
                                 "site-a")] * 2
    assert {e["study_uid"] for e in stows} == {stow_study}

    queries = [(e["protocol"], e["resource"], e["detail"]) for e in events if e["event"] == "Query"]
    assert queries == [
        ("QIDO-RS", "STUDY", {"keys": [], "matches": 2}),
        ("QIDO-RS", "STUDY", {"keys": ["PatientName"], "matches": 0}),
        ("QIDO-RS", "SERIES", {"keys": ["StudyInstanceUID"], "matches": 1}),
        ("C-FIND", "STUDY", {"keys": ["PatientID"], "matches": 0}),
    ]
    [qido] = [e for e in events if e["detail"].get("keys") == ["PatientName"]]
    assert (qido["who"], qido["role"], qido["action"], qido["outcome"]) == (
        "research", "researcher", "E", 0)

    retrievals = [e for e in events if e["protocol"] == "WADO-RS"]
    assert [(e["resource"], e["study_uid"], e["action"], e["outcome"]) for e in retrievals] == [
        ("/dicom-web/studies/{study}", study_uid, "R", 0),
        ("/dicom-web/studies/{study}/metadata", None, "R", 4),  # not found: no UID recorded
    ]
    [get] = [e for e in events if e["protocol"] == "C-GET"]
    assert (get["event"], get["action"], get["outcome"], get["study_uid"], get["who"]) == (
        "Begin Transferring DICOM Instances", "E", 0, study_uid, "GETSCU")
    assert get["detail"]["instances"] == 2

    [rejected] = [e for e in events if e["event"] == "Security Alert"
                  and e["protocol"] == "DIMSE"]
    assert (rejected["type"], rejected["who"], rejected["outcome"], rejected["detail"]) == (
        "Node Authentication", "INTRUDER", 4, {"reason": "calling-ae-title-not-recognised"})
    refused = [(e["event"], e["type"], e["resource"], e["detail"]["status"], e["role"])
               for e in events if e["protocol"] == "HTTP"]
    assert refused == [
        ("User Authentication", "Login", "/dicom-web/studies", 401, "anonymous"),
        ("User Authentication", "Login", "/wado", 401, "anonymous"),
        ("Security Alert", "Use of Restricted Function", "/dicom-web/studies", 403,
         "researcher"),
    ]
    associations = [(e["who"], e["type"], e["detail"].get("ended")) for e in events
                    if e["event"] == "Network Entry"]
    assert associations.count(("STORESCU", "Attach", None)) == 2
    assert associations.count(("STORESCU", "Detach", "released")) == 2
    assert ("FINDSCU", "Detach", "released") in associations
    assert ("INTRUDER", "Attach", None) not in associations
    assert {k[0] for k in kinds} <= {e.meaning for e in audit_trail.EventId}

    queried = audit_events(archive, "--action", "Query", "--who", "research")
    assert [e["detail"]["keys"] for e in queried] == [[], ["PatientName"], ["StudyInstanceUID"]]
    assert [e["protocol"] for e in audit_events(archive, "--outcome", "serious")] == []
    assert {e["action"] for e in audit_events(archive, "--action", "r")} == {"R"}
    assert audit_events(archive, "--since", "2999-01-01") == []
    assert audit_events(archive, "--until", "2000-01-01T00:00:00+00:00") == []
    used = audit_events(archive, "--action", "Audit Log Used")
    assert len(used) == 6 and used[-1]["detail"]["filters"] == ["until"]
    table = subprocess.run(archive.command("audit", "--limit", "3"), capture_output=True,
                           text=True, check=True).stdout.splitlines()
    assert table[0].split()[:3] == ["at", "event", "type"] and len(table) == 4

    # No planted value in what the audit table holds (every column of every row) or in the log.
    needles = _needles(corpus.corpus.planted)
    everything = subprocess.run(archive.command("audit", "--json", "--limit", "100000"),
                                capture_output=True, check=True).stdout
    assert len(everything.splitlines()) > len(events)
    assert _hits(everything, needles) == set()
    assert _hits(Path(archive.log_path).read_bytes(), needles) == set()
    sent = b"".join(p.read_bytes() for p in corpus.corpus.files) + (tmp_path / "no-id.dcm") \
        .read_bytes()
    assert _hits(sent, needles) == needles  # the scanner finds every value where it is


def test_audit_off_records_nothing(make_archive):
    archive = make_archive("audit-off", "[server]\naudit = false\n")
    assert dcmtk.echoscu(archive.dimse_port).returncode == 0
    assert requests.get(f"{archive.dicomweb_url}/studies", timeout=30).status_code == 200
    archive.stop()
    assert audit_events(archive) == []
    assert audit_events(archive) == []  # reading it is not recorded either


def test_imports_are_audited(corpus, tmp_path):
    archive = Archive(tmp_path / "data", tmp_path / "archive.log")  # never served: the tools
    files = corpus.study(corpus.patient(), dt.date(2022, 5, 6), slices=2)
    imported = subprocess.run(archive.command("import", "--site", "default", *map(str, files)),
                              capture_output=True, timeout=120)
    assert imported.returncode == 0, imported.stderr
    try:
        events = audit_events(archive)
    finally:
        _stop_leftover_postgres(archive.data_dir)
    stores = [e for e in events if e["protocol"] == "import"]
    assert [(e["action"], e["outcome"], e["role"], e["site"]) for e in stores] == [
        ("C", 0, "operator", "default")] * 2
    assert len({e["sop_uid"] for e in stores}) == 2
    assert all(e["sop_uid"].startswith("2.25.") for e in stores)
    assert _hits("\n".join(map(json.dumps, events)).encode(), _needles(corpus.corpus.planted)) \
        == set()
