"""GET /ready names what keeps the archive from serving, each failure caused for real: a
read-only blob store (whose failed writes are counted in /metrics), a migration the index does
not match, the database stopped. /health (liveness) stays 200 meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import requests

from ricord_archive.index.embedded import EmbeddedPostgres
from tests import dcmtk
from tests.scrape import scrape

DEADLINE = 30.0
# One process (its patient cache is the one warmed up below); segments of 1 MiB, so that a
# larger object is a file of its own, written while the blob store is read-only.
CONFIG = """
[server]
processes = 1

[limits]
blob_segment_bytes = 1048576
"""


def _ready(archive) -> tuple[int, dict]:
    answer = requests.get(f"{archive.root}/ready", timeout=30)
    assert answer.headers["Content-Type"].startswith("application/json")
    return answer.status_code, answer.json()


def _until_ready(archive, ready: bool) -> dict:
    """Poll /ready until it says `ready` (every server process must, in turn)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        status, body = _ready(archive)
        if (status == 200) == ready:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.1)  # polling interval, not a wait for an outcome


@contextlib.contextmanager
def _read_only(directory: Path) -> Iterator[None]:
    """The directory on a read-only mount of itself (a full or failed disk remounted ro)."""
    subprocess.run(["mount", "--bind", str(directory), str(directory)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(directory)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def _execute(url: str, statement: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


def test_ready_names_what_is_not_ready(make_archive, corpus):
    archive = make_archive("ready", CONFIG)
    patient = corpus.patient()
    small = corpus.study(patient, dt.date(2020, 1, 2), slices=1)
    large = corpus.study(patient, dt.date(2020, 2, 3), slices=1, size=1024)  # 2 MiB
    assert "(Success)" in dcmtk.storescu(archive.dimse_port, small).stderr
    status, body = _ready(archive)
    assert status == 200
    assert body == {"status": "ready", "not_ready": [], "checks": {
        "server": "ok", "database": "ok", "blob_store": "ok", "migrations": "ok"}}

    with _read_only(archive.data_dir / "blobs"):
        body = _until_ready(archive, ready=False)
        assert body["not_ready"] == ["blob_store"]
        assert body["checks"]["blob_store"] == "not writable: OSError (EROFS)"
        assert requests.get(f"{archive.root}/health", timeout=30).status_code == 200
        stored = dcmtk.storescu(archive.dimse_port, large).stderr
        assert "Received Store Response (Refused: OutOfResources" in stored
    found = scrape(f"{archive.root}/metrics")
    assert found.value("ricord_blob_store_errors_total", operation="write") == 1
    assert found.value("ricord_ingest_objects_total", outcome="failed") == 1
    newcomer = corpus.study(corpus.patient(), dt.date(2020, 3, 4), slices=1)[0]
    with _read_only(archive.data_dir / "blobs"):  # a new patient's allocation record fails
        answer = requests.post(
            f"{archive.dicomweb_url}/studies",
            data=b"--b\r\nContent-Type: application/dicom\r\n\r\n" + newcomer.read_bytes()
            + b"\r\n--b--\r\n",
            headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
            timeout=60,
        )
        assert answer.status_code == 503
        assert "the blob store is unavailable" in answer.text  # not "the index"
    _until_ready(archive, ready=True)
    assert "(Success)" in dcmtk.storescu(archive.dimse_port, large).stderr

    database = EmbeddedPostgres(archive.data_dir / "pg")
    url = database.current_url()
    assert url is not None
    _execute(url, "INSERT INTO schema_migration (version, name, checksum) "
                  "VALUES (9999, '9999_from_a_newer_archive.sql', 'x')")
    body = _until_ready(archive, ready=False)
    assert body["not_ready"] == ["migrations"]
    assert body["checks"]["migrations"] == "applied but unknown to this version: 9999"
    _execute(url, "DELETE FROM schema_migration WHERE version = 9999")
    _until_ready(archive, ready=True)

    database.stop()
    try:
        body = _until_ready(archive, ready=False)
        assert body["not_ready"] == ["database", "migrations"]
        assert body["checks"]["database"].startswith("unreachable: ")
        assert requests.get(f"{archive.root}/health", timeout=30).status_code == 200
    finally:
        database.start()
    _until_ready(archive, ready=True)
    assert dcmtk.echoscu(archive.dimse_port).returncode == 0
