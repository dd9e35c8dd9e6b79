"""The HTTP listener against the real archive: HTTPS with a certificate made here, and the
deadlines (request headers, a stalled STOW-RS body, a client that stops reading) cutting off a
slow client while a normal client keeps being answered."""

from __future__ import annotations

import datetime
import http.client
import io
import ipaddress
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file

from ricord_archive.web.listener import tls_context
from tests.conftest import Archive
from tests.web.test_auth import ct

pytestmark = pytest.mark.slow  # a server process per test

DEADLINE = 60.0  # generous: the configured timeouts below are 2 s
ROOT = "1.2.826.0.1.3680043.10.3"
LIMITS = """
[limits]
http_header_timeout = 2
http_body_idle_timeout = 2
http_send_timeout = 2
"""


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, signed by its own key: (cert, key) files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ricord-archive test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    return cert_path, key_path


def archive_with(base: Path, config: str, cafile: Path | None = None) -> Archive:
    (base / "config.toml").write_text(config)
    return Archive(base / "data", base / "archive.log", base / "config.toml", cafile=cafile)


# --- HTTPS --------------------------------------------------------------------------------


def test_tls_context_refuses_anything_older_than_tls_1_2(tmp_path):
    assert tls_context(*self_signed(tmp_path)).minimum_version == ssl.TLSVersion.TLSv1_2


@pytest.fixture(scope="module")
def https_archive(tmp_path_factory) -> Iterator[Archive]:
    base = tmp_path_factory.mktemp("https")
    cert, key = self_signed(base)
    archive = archive_with(base, f'[server]\ntls_cert = "{cert}"\ntls_key = "{key}"\n',
                           cafile=cert).start()
    yield archive
    archive.stop()


def test_https_serves_dicomweb_to_a_verifying_client(https_archive):
    session = requests.Session()
    session.trust_env = False  # else REQUESTS_CA_BUNDLE, when set, overrides session.verify
    session.verify = str(https_archive.cafile)
    client = DICOMwebClient(https_archive.dicomweb_url, session=session)
    [item] = client.store_instances([ct("PAT-TLS", f"{ROOT}.1")]).ReferencedSOPSequence
    assert item.RetrieveURL.startswith(f"{https_archive.dicomweb_url}/studies/")
    [study] = client.search_for_studies(search_filters={"PatientID": "*"})
    assert study["00081190"]["Value"][0].startswith("https://127.0.0.1:")
    with socket.create_connection(("127.0.0.1", https_archive.http_port)) as raw, \
            ssl.create_default_context(cafile=https_archive.cafile).wrap_socket(
                raw, server_hostname="127.0.0.1") as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_https_refuses_plain_http_and_unverified_certificates(https_archive):
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{https_archive.http_port}/health", timeout=30)
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{https_archive.root}/health", timeout=30)  # the system's CAs only


def test_an_unreadable_key_stops_the_archive_with_a_message(tmp_path):
    cert, _ = self_signed(tmp_path)
    archive = archive_with(tmp_path, f'[server]\ntls_cert = "{cert}"\n'
                           f'tls_key = "{tmp_path / "missing.pem"}"\n')
    with pytest.raises(RuntimeError, match="cannot load tls_cert"):
        archive.start()


# --- deadlines ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Iterator[Archive]:
    archive = archive_with(tmp_path_factory.mktemp("deadlines"), LIMITS).start()
    yield archive
    archive.stop()


def qido_answers(archive: Archive) -> bool:
    response = requests.get(archive.dicomweb_url + "/studies", timeout=10,
                            headers={"Accept": "application/dicom+json"})
    return response.status_code == 200


def wait_closed(sock: socket.socket, archive: Archive, trickle: bytes = b"") -> bytes:
    """Everything the server sends until it closes the connection (sending `trickle` a byte
    at a time meanwhile), checking that QIDO keeps answering; fails at the deadline."""
    sock.settimeout(0.5)
    received, sent = b"", 0
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        try:
            if sent < len(trickle):
                sock.send(trickle[sent:sent + 1])
                sent += 1
            chunk = sock.recv(65536)
        except TimeoutError:
            assert qido_answers(archive)
            continue
        except (ConnectionResetError, BrokenPipeError):
            return received
        if not chunk:
            return received
        received += chunk
    pytest.fail(f"the connection was still open after {DEADLINE} s")


def log_count(archive: Archive, text: str) -> int:
    return archive.log().count(text)


def test_headers_sent_a_byte_at_a_time_are_cut_off(archive):
    before = log_count(archive, "no complete request headers")
    with socket.create_connection(("127.0.0.1", archive.http_port)) as sock:
        sock.sendall(b"GET /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert wait_closed(sock, archive, trickle=b"X-Slow: " + b"a" * 1000) == b""
    assert log_count(archive, "no complete request headers") == before + 1


def test_a_connection_that_sends_nothing_is_closed(archive):
    with socket.create_connection(("127.0.0.1", archive.http_port)) as sock:
        assert wait_closed(sock, archive) == b""


def test_an_idle_kept_alive_connection_is_not_cut_at_the_header_deadline(archive):
    connection = http.client.HTTPConnection("127.0.0.1", archive.http_port, timeout=30)
    try:
        connection.request("GET", "/health")
        assert connection.getresponse().read()
        connection.sock.settimeout(4)  # twice the header deadline without a byte sent
        with pytest.raises(TimeoutError):
            connection.sock.recv(1)  # nothing comes, and the connection stays open
        connection.request("GET", "/health")
        assert connection.getresponse().status == 200
    finally:
        connection.close()


def stow_head(length: int) -> bytes:
    return (
        "POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        'Content-Type: multipart/related; type="application/dicom"; boundary=b\r\n'
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def test_a_stalled_stow_body_gets_408_and_the_connection_closed(archive):
    before = log_count(archive, "STOW-RS body stalled")
    with socket.create_connection(("127.0.0.1", archive.http_port)) as sock:
        sock.sendall(stow_head(100_000) + b"--b\r\nContent-Type: application/dicom\r\n\r\n"
                     + b"\0" * 100)
        answer = wait_closed(sock, archive)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert log_count(archive, "STOW-RS body stalled") == before + 1


def dicom_bytes(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_a_slow_but_steady_stow_body_is_stored(archive):
    """Pauses shorter than the idle timeout, adding up to more than it: stored."""
    body = (b"--b\r\nContent-Type: application/dicom\r\n\r\n"
            + dicom_bytes(ct("PAT-SLOW", f"{ROOT}.2")) + b"\r\n--b--\r\n")
    pieces = [body[i:i + len(body) // 4 + 1] for i in range(0, len(body), len(body) // 4 + 1)]
    with socket.create_connection(("127.0.0.1", archive.http_port)) as sock:
        sock.sendall(stow_head(len(body)))
        for piece in pieces[:-1]:
            sock.sendall(piece)
            sock.settimeout(1)  # a one-second pause, half the idle timeout
            with pytest.raises(TimeoutError):
                sock.recv(1)
        sock.sendall(pieces[-1])
        sock.settimeout(DEADLINE)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")


@pytest.fixture(scope="module")
def big(archive) -> tuple[str, str, str]:
    """A CT of 8 MiB of pixels (far more than socket buffers hold): its stored UIDs."""
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    dataset.PatientID = "PAT-BIG"
    dataset.Rows = dataset.Columns = 2048
    dataset.PixelData = bytes(range(256)) * (2048 * 2048 * 2 // 256)
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = f"{ROOT}.3.1", f"{ROOT}.3.2"
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = f"{ROOT}.3.3"
    [item] = archive.client().store_instances([dataset]).ReferencedSOPSequence
    parts = item.RetrieveURL.split("/dicom-web/")[1].split("/")
    return parts[1], parts[3], parts[5]


@pytest.mark.parametrize("accept", [
    'multipart/related; type="application/dicom"; transfer-syntax=*',  # stored: sendfile
    'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2',  # encoded
])
def test_a_client_that_stops_reading_is_cut_off(archive, big, accept):
    study, series, instance = big
    before = log_count(archive, "the client read nothing")
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", archive.http_port))
        sock.sendall(
            f"GET /dicom-web/studies/{study}/series/{series}/instances/{instance} HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nAccept: {accept}\r\n\r\n".encode()
        )
        deadline = time.monotonic() + DEADLINE
        while log_count(archive, "the client read nothing") == before:
            assert time.monotonic() < deadline, "the server still waits for the reader"
            assert qido_answers(archive)
            time.sleep(0.2)  # polling interval, not a wait for an outcome
        received = wait_closed(sock, archive)
    assert len(received) < 2048 * 2048 * 2  # (a reset may discard what was unread)
