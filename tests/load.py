"""Helpers of the load tests (crash, many senders): STOW-RS requests by hand, WADO-RS study
retrieval as raw parts, the index read directly from PostgreSQL, and DCMTK storescu output
parsed per file."""

from __future__ import annotations

import asyncio
import hashlib
import re
import subprocess
import uuid
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import asyncpg
import pydicom
import requests

from ricord_archive.blobstore import FileBlobStore
from tests.conftest import Archive

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"


def stow_body(parts: list[bytes]) -> tuple[bytes, str]:
    """A multipart/related body of DICOM parts, and its Content-Type."""
    boundary = uuid.uuid4().hex
    chunks = []
    for part in parts:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), part,
                   b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


def stow(session: requests.Session, archive: Archive, parts: list[bytes],
         timeout: float = 60) -> requests.Response:
    body, content_type = stow_body(parts)
    return session.post(f"{archive.dicomweb_url}/studies", data=body, timeout=timeout,
                        headers={"Content-Type": content_type,
                                 "Accept": "application/dicom+json"})


def referenced_uids(answer: dict) -> list[str]:
    """The SOP Instance UIDs of a STOW-RS answer's ReferencedSOPSequence, in order."""
    items = answer.get(REFERENCED_SOP_SEQUENCE, {}).get("Value", [])
    return [item["00081155"]["Value"][0] for item in items]


def multipart_parts(response: requests.Response) -> list[bytes]:
    """The bodies of a multipart/related response (WADO-RS)."""
    match = re.search(r'boundary="?([^";]+)"?', response.headers["Content-Type"])
    assert match, response.headers["Content-Type"]
    delimiter = b"--" + match.group(1).encode()
    parts = []
    for chunk in response.content.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        _, _, body = chunk.partition(b"\r\n\r\n")
        parts.append(body[:-2] if body.endswith(b"\r\n") else body)
    return parts


def retrieve_study(session: requests.Session, archive: Archive, study_uid: str
                   ) -> dict[str, bytes]:
    """WADO-RS of a whole study as stored: {SOP Instance UID: Part 10 bytes}."""
    response = session.get(
        f"{archive.dicomweb_url}/studies/{study_uid}", timeout=120,
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
    )
    assert response.status_code == 200, (response.status_code, response.text[:200])
    found = {}
    for part in multipart_parts(response):
        dataset = pydicom.dcmread(BytesIO(part), stop_before_pixels=True)
        found[str(dataset.SOPInstanceUID)] = part
    return found


@dataclass(frozen=True)
class IndexedInstance:
    sop_uid: str
    series_uid: str
    study_uid: str
    blob_key: str
    size_bytes: int
    sha256: bytes


def db_url(archive: Archive) -> str:
    result = subprocess.run(archive.command("db-url"), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def query(archive: Archive, sql: str, *args: object) -> list[asyncpg.Record]:
    """One SQL query on the archive's index (the archive, or its PostgreSQL, must run)."""
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(db_url(archive))
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


def indexed_instances(archive: Archive) -> dict[str, IndexedInstance]:
    rows = query(archive, """
        SELECT i.sop_uid, se.series_uid, st.study_uid, i.blob_key, i.size_bytes, i.sha256
        FROM instance i JOIN series se ON se.pk = i.series_pk JOIN study st ON st.pk = i.study_pk
    """)
    return {r["sop_uid"]: IndexedInstance(*r) for r in rows}


def blob_store(archive: Archive) -> FileBlobStore:
    """The archive's blob store, to read (this process never writes to it)."""
    return FileBlobStore(archive.data_dir / "blobs")


def blob_problems(archive: Archive, indexed: dict[str, IndexedInstance]) -> list[str]:
    """Index rows whose blob is missing, short, or not the bytes the index has the hash of."""
    problems = []
    blobs = blob_store(archive)
    for row in indexed.values():
        try:
            with blobs.open(row.blob_key) as stream:
                data = stream.read()
        except FileNotFoundError:
            problems.append(f"{row.sop_uid}: blob missing")
            continue
        if len(data) != row.size_bytes:
            problems.append(f"{row.sop_uid}: blob of {len(data)} bytes, index {row.size_bytes}")
        elif hashlib.sha256(data).digest() != row.sha256:
            problems.append(f"{row.sop_uid}: blob content differs from the index sha256")
    return problems


def stored_blobs(data_dir: Path) -> dict[str, bytes]:
    """Key -> bytes of every blob in `<data_dir>/blobs` (segments and files of their own)."""
    store = FileBlobStore(data_dir / "blobs")
    found = {}
    for key, _, _ in store.walk():
        with store.open(key) as stream:
            found[key] = stream.read()
    return found


def blob_keys_on_disk(archive: Archive) -> set[str]:
    return {key for key, _, _ in blob_store(archive).walk()}


_SENDING = re.compile(r"^I: Sending file: (.+)$")
_RESPONSE = re.compile(r"^I: Received Store Response \((.+)\)$")


def storescu_outcomes(output: str) -> dict[Path, str]:
    """storescu -v output: the response status of each file that got one ("Success", ...)."""
    outcomes: dict[Path, str] = {}
    current: Path | None = None
    for line in output.splitlines():
        if sending := _SENDING.match(line):
            current = Path(sending.group(1))
        elif (response := _RESPONSE.match(line)) and current is not None:
            outcomes[current] = response.group(1)
            current = None
    return outcomes
