"""DICOM TLS on the second DIMSE port: C-ECHO and C-STORE with a client certificate from the
configured CA (pynetdicom and DCMTK as peers); clients without such a certificate, TLS 1.1 and
plain DIMSE refused; a peer that never finishes its handshake does not hold the port."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from ricord_archive.config import TlsConfig
from ricord_archive.dimse.security import tls_context
from tests import dcmtk
from tests.conftest import Archive, every_instance, free_port
from tests.phi_corpus import PhiCorpus

DEADLINE = 30.0
REFUSED = "DICOM TLS handshake with"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: tuple[Path, Path]  # certificate, key
    client: tuple[Path, Path]
    stranger: tuple[Path, Path]  # a client certificate from another CA


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _certificate(
    subject: str, key: rsa.RSAPrivateKey, issuer: x509.Certificate | None,
    issuer_key: rsa.RSAPrivateKey, usage: x509.ObjectIdentifier | None,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder().subject_name(name)
        .issuer_name(issuer.subject if issuer else name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(1))
        .add_extension(x509.BasicConstraints(ca=usage is None, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, cert: x509.Certificate,
           key: rsa.RSAPrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ))
    return cert_path, key_path


def make_pki(directory: Path) -> Pki:
    """A self-signed CA, a server and a client certificate it signs, and a stranger's."""
    ca_key, other_ca_key = _key(), _key()
    ca = _certificate("ricord test CA", ca_key, None, ca_key, None)
    other_ca = _certificate("another CA", other_ca_key, None, other_ca_key, None)
    server_key, client_key, stranger_key = _key(), _key(), _key()
    server = _certificate("localhost", server_key, ca, ca_key, ExtendedKeyUsageOID.SERVER_AUTH)
    client = _certificate("site-a", client_key, ca, ca_key, ExtendedKeyUsageOID.CLIENT_AUTH)
    stranger = _certificate(
        "stranger", stranger_key, other_ca, other_ca_key, ExtendedKeyUsageOID.CLIENT_AUTH
    )
    ca_path, _ = _write(directory, "ca", ca, ca_key)
    return Pki(
        ca_path, _write(directory, "server", server, server_key),
        _write(directory, "client", client, client_key),
        _write(directory, "stranger", stranger, stranger_key),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def archive(tmp_path_factory, pki) -> tuple[Archive, int]:
    """An archive requiring client certificates on its TLS port; (archive, TLS port)."""
    base = tmp_path_factory.mktemp("tls")
    tls_port = free_port()
    config = base / "config.toml"
    config.write_text(
        f'[tls]\nport = {tls_port}\ncert = "{pki.server[0]}"\nkey = "{pki.server[1]}"\n'
        f'ca = "{pki.ca}"\nrequire_client_cert = true\n[limits]\nnetwork_timeout = 5\n'
    )
    archive = Archive(base / "data", base / "archive.log", config).start()
    yield archive, tls_port
    archive.stop()


def client_context(pki: Pki, identity: tuple[Path, Path] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=pki.ca)
    if identity is not None:
        context.load_cert_chain(*identity)
    return context


def wait_for_log(archive: Archive, text: str, count: int = 1) -> bool:
    """Whether the archive's log holds `text` `count` times within the deadline."""
    deadline = time.monotonic() + DEADLINE
    while archive.log().count(text) < count and time.monotonic() < deadline:
        time.sleep(0.1)  # polling the log
    return archive.log().count(text) >= count


def associate(port: int, context: ssl.SSLContext | None, *contexts: str):
    ae = AE(ae_title="TLSSCU")
    ae.connection_timeout = ae.acse_timeout = ae.network_timeout = DEADLINE
    for abstract_syntax in contexts or (Verification,):
        ae.add_requested_context(abstract_syntax)
    tls_args = (context, "localhost") if context is not None else None
    return ae.associate("127.0.0.1", port, ae_title="RICORD", tls_args=tls_args)


def test_c_echo_and_c_store_over_tls(archive, pki, tmp_path):
    archive, tls_port = archive
    assoc = associate(tls_port, client_context(pki, pki.client), Verification, CTImageStorage)
    assert assoc.is_established
    corpus = PhiCorpus(seed=11, out_dir=tmp_path)
    path = corpus.study(corpus.patient(), dt.date(2022, 5, 6), slices=1)[0]
    try:
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(path).Status == 0x0000
    finally:
        assoc.release()
    sop_uid = pydicom.dcmread(path).SOPInstanceUID
    assert sop_uid not in archive.log()
    assert len(every_instance(archive.client())) == 1


@pytest.mark.skipif(dcmtk.tool("echoscu") is None, reason="DCMTK's echoscu is not installed")
def test_dcmtk_echoscu_over_tls(archive, pki):
    archive, tls_port = archive
    cert, key = pki.client
    result = dcmtk.run(
        "echoscu", "+tls", str(key), str(cert), "+cf", str(pki.ca), "-aet", "ECHOTLS",
        "-aec", "RICORD", "127.0.0.1", str(tls_port),
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("identity", ["none", "stranger"])
def test_a_client_without_a_certificate_of_the_ca_is_refused(archive, pki, identity):
    archive, tls_port = archive
    refusals = archive.log().count(REFUSED)
    assoc = associate(tls_port, client_context(pki, pki.stranger if identity == "stranger"
                                                else None))
    assert not assoc.is_established
    assert wait_for_log(archive, REFUSED, refusals + 1)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
def test_tls_1_1_is_refused(archive, pki):
    archive, tls_port = archive
    context = client_context(pki, pki.client)
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 offers TLS 1.1 only at level 0
    with (
        socket.create_connection(("127.0.0.1", tls_port), timeout=DEADLINE) as sock,
        pytest.raises(ssl.SSLError),
    ):
        context.wrap_socket(sock, server_hostname="localhost")
    assert wait_for_log(archive, "failed: UNSUPPORTED_PROTOCOL")  # refused by the archive


def test_the_context_accepts_tls_1_2_or_later_only(pki):
    context = tls_context(TlsConfig(0, pki.server[0], pki.server[1], pki.ca, True))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED
    optional = tls_context(TlsConfig(0, pki.server[0], pki.server[1], pki.ca, False))
    assert optional.verify_mode == ssl.CERT_OPTIONAL


def test_plain_dimse_on_the_tls_port_is_refused(archive):
    archive, tls_port = archive
    assoc = associate(tls_port, None)
    assert not assoc.is_established


def test_a_peer_that_never_finishes_its_handshake_does_not_hold_the_port(archive, pki):
    archive, tls_port = archive
    with socket.create_connection(("127.0.0.1", tls_port)) as silent:
        silent.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
        started = time.monotonic()
        assoc = associate(tls_port, client_context(pki, pki.client))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        assert time.monotonic() - started < DEADLINE
