"""Structured logs: with log_format = "json" one JSON object a line, with the id of the HTTP
request (also its X-Request-ID header) or of the DIMSE association (also in the audit trail)
a line is about; text stays the default."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time

import asyncpg
import pydicom
import requests

from ricord_archive.index.embedded import EmbeddedPostgres
from tests import dcmtk

CONFIG = """
[server]
log_format = "json"

[[sites]]
name = "hospital-a"
aets = ["PACS_A"]
"""
_KEYS = {"time", "level", "logger", "message", "process"}


def _stow(archive, path) -> requests.Response:
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + path.read_bytes() + b"\r\n--b--\r\n"
    return requests.post(f"{archive.dicomweb_url}/studies", data=body, timeout=60, headers={
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=b'})


def _burned_in(path, out):
    dataset = pydicom.dcmread(path)
    dataset.BurnedInAnnotation = "YES"
    dataset.save_as(out, enforce_file_format=True)
    return out


def _association_ids(archive) -> set[str]:
    async def read() -> set[str]:
        url = EmbeddedPostgres(archive.data_dir / "pg").current_url()
        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch("SELECT detail->>'association' AS id FROM audit_event "
                                    "WHERE resource = 'association'")
        finally:
            await conn.close()
        return {r["id"] for r in rows if r["id"]}

    return asyncio.run(read())


def test_json_lines_carry_request_and_association_ids(make_archive, corpus, tmp_path):
    archive = make_archive("json-logs", CONFIG)
    [path] = corpus.study(corpus.patient(), dt.date(2022, 1, 3), slices=1)
    refused = _burned_in(path, tmp_path / "burned.dcm")
    answer = _stow(archive, refused)
    assert answer.status_code == 409
    request_id = answer.headers["X-Request-ID"]
    assert "Status: 0x124" in dcmtk.storescu(archive.dimse_port, [refused], "PACS_A").stderr
    assert dcmtk.echoscu(archive.dimse_port, "INTRUDER").returncode != 0
    other = requests.get(f"{archive.dicomweb_url}/studies", timeout=30).headers["X-Request-ID"]
    assert other != request_id

    lines = [json.loads(line) for line in archive.log().splitlines() if line.strip()]
    assert all(set(entry) >= _KEYS for entry in lines)
    assert all(dt.datetime.fromisoformat(entry["time"]).tzinfo for entry in lines)
    of_request = [e for e in lines if e.get("request_id") == request_id]
    assert any(e["message"].startswith("STOW-RS object refused") for e in of_request)
    stored = [e for e in lines if e["message"].startswith("C-STORE refused")]
    rejected = [e for e in lines if "rejected (calling AE title" in e["message"]]
    assert len(stored) == len(rejected) == 1
    assert stored[0]["association_id"] != rejected[0]["association_id"]
    assert "request_id" not in stored[0]
    deadline = time.monotonic() + 30  # the audit trail is written every 100 ms
    while stored[0]["association_id"] not in _association_ids(archive):
        assert time.monotonic() < deadline, "the association is not in the audit trail"
        time.sleep(0.1)  # polling interval, not a wait for an outcome


def test_text_stays_the_default(make_archive):
    archive = make_archive("text-logs")
    answer = requests.get(f"{archive.root}/health", timeout=30)
    assert len(answer.headers["X-Request-ID"]) == 16
    from_browser = requests.get(f"{archive.dicomweb_url}/studies", timeout=30,
                                headers={"Origin": "https://viewer.example.org"})
    assert "x-request-id" in from_browser.headers["Access-Control-Expose-Headers"].lower()
    lines = [line for line in archive.log().splitlines() if line.strip()]
    assert lines and not any(line.startswith("{") for line in lines)
    assert any(" INFO ricord_archive.archive: ricord-archive ready" in line for line in lines)
