"""A hostile DIMSE peer on raw sockets: oversized and absurd PDU lengths, garbage, PDUs out of
order and stalls mid-PDU each end in an A-ABORT or a closed connection, and a good peer's
C-ECHO is answered while they are going on and afterwards."""

from __future__ import annotations

import datetime as dt
import socket
import struct
import time

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from tests import dcmtk
from tests.conftest import Archive
from tests.phi_corpus import PhiCorpus

pytestmark = pytest.mark.slow  # hostile DIMSE peers waiting out timeouts

MAX_PDU = 16384
NETWORK_TIMEOUT = 2  # seconds: the archive closes a connection stalled mid-PDU after this
DEADLINE = 30.0  # generous: for an outcome that otherwise never comes
A_ASSOCIATE_AC, P_DATA_TF, A_ABORT = 0x02, 0x04, 0x07


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Archive:
    base = tmp_path_factory.mktemp("hostile")
    config = base / "config.toml"
    config.write_text(
        f"[limits]\nmax_pdu_bytes = {MAX_PDU}\nnetwork_timeout = {NETWORK_TIMEOUT}\n"
        "acse_timeout = 5\n"
    )
    archive = Archive(base / "data", base / "archive.log", config).start()
    yield archive
    archive.stop()


def pdu(pdu_type: int, body: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body) if length is None else length) + body


def item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def associate_rq(calling: str = "HOSTILE", called: str = "RICORD") -> bytes:
    """An A-ASSOCIATE-RQ proposing Verification in Implicit VR Little Endian."""
    context = bytes([1, 0, 0, 0]) + item(0x30, b"1.2.840.10008.1.1") + item(
        0x40, b"1.2.840.10008.1.2"
    )
    body = (
        struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode()
        + bytes(32) + item(0x10, b"1.2.840.10008.3.1.1.1") + item(0x20, context)
        + item(0x50, item(0x51, struct.pack(">L", MAX_PDU)))
    )
    return pdu(0x01, body)


def connect(archive: Archive) -> socket.socket:
    return socket.create_connection(("127.0.0.1", archive.dimse_port), timeout=DEADLINE)


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(min(count - len(data), 65536))
        if not chunk:
            break
        data += chunk
    return data


def received(sock: socket.socket) -> list[int]:
    """The types of the PDUs the archive sends until it closes the connection (a socket
    timeout, failing the test, if it does not within the deadline)."""
    types = []
    try:
        while len(header := recv_exactly(sock, 6)) == 6:
            types.append(header[0])
            recv_exactly(sock, struct.unpack(">L", header[2:])[0])
    except ConnectionResetError:
        pass
    return types


def associated(archive: Archive) -> socket.socket:
    sock = connect(archive)
    sock.sendall(associate_rq())
    header = recv_exactly(sock, 6)
    assert header[0] == A_ASSOCIATE_AC
    recv_exactly(sock, struct.unpack(">L", header[2:])[0])
    return sock


def echo(archive: Archive) -> None:
    """A good peer's C-ECHO, answered within the deadline."""
    started = time.monotonic()
    result = dcmtk.echoscu(archive.dimse_port)
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - started < DEADLINE


@pytest.mark.parametrize("length", [MAX_PDU + 64 + 1, 0xFFFFFFFF], ids=["over-max", "absurd"])
def test_a_p_data_pdu_beyond_the_announced_maximum_is_aborted(archive, length):
    with associated(archive) as sock:
        sock.sendall(pdu(P_DATA_TF, b"\x00" * 1024, length))
        assert received(sock) == [A_ABORT]
    assert f"announcing {length} bytes" in archive.log()
    echo(archive)


def test_an_absurd_association_request_is_aborted_unread(archive):
    with connect(archive) as sock:
        sock.sendall(pdu(0x01, b"\x00" * 1024, 0xFFFFFFFF))
        assert received(sock) == [A_ABORT]
    echo(archive)


@pytest.mark.parametrize("data", [
    b"\xff" * 64,  # unknown PDU type
    pdu(0x01, b"\x13\x37" * 40),  # an association request that does not decode
    pdu(0x05, bytes(4)),  # A-RELEASE-RQ before any association
    pdu(P_DATA_TF, struct.pack(">L", 12) + b"\x01\x03" + bytes(10)),  # P-DATA, no association
], ids=["unknown-type", "garbage-request", "release-first", "p-data-first"])
def test_garbage_and_pdus_out_of_order_are_aborted(archive, data):
    with connect(archive) as sock:
        sock.sendall(data)
        assert received(sock) == [A_ABORT]
    echo(archive)


def test_peers_stalling_mid_pdu_are_closed_while_others_are_served(archive):
    before = connect(archive)  # stalls in the middle of its association request
    before.sendall(associate_rq()[:40])
    during = associated(archive)  # stalls in the middle of a P-DATA-TF PDU
    during.sendall(pdu(P_DATA_TF, b"", 200) + bytes(20))
    silent = connect(archive)  # says nothing at all
    with before, during, silent:
        echo(archive)  # answered while the three stall
        started = time.monotonic()
        for sock in (before, during, silent):
            assert A_ASSOCIATE_AC not in received(sock)
        assert time.monotonic() - started < DEADLINE
    echo(archive)


def test_p_data_pdus_of_the_announced_maximum_are_accepted(archive, tmp_path):
    """A C-STORE cut into PDUs of exactly the maximum length the archive announced."""
    corpus = PhiCorpus(seed=7, out_dir=tmp_path)
    dataset = pydicom.dcmread(corpus.study(corpus.patient(), dt.date(2021, 3, 4), slices=1)[0])
    dataset.Rows = dataset.Columns = 256  # 128 KiB of pixels: eight PDUs
    dataset.PixelData = bytes(256 * 256 * 2)
    lengths: list[int] = []

    def sent(event: evt.Event) -> None:
        if event.data[0] == P_DATA_TF:
            lengths.append(struct.unpack(">L", event.data[2:6])[0])

    ae = AE(ae_title="BIGPDU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(
        "127.0.0.1", archive.dimse_port, ae_title="RICORD",
        evt_handlers=[(evt.EVT_DATA_SENT, sent)],
    )
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == MAX_PDU
    try:
        status = assoc.send_c_store(dataset)
    finally:
        assoc.release()
    assert status.Status == 0x0000
    assert max(lengths) == MAX_PDU
