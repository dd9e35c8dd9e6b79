"""The association on raw sockets: DIMSE messages fragmented every way PS3.8 allows, a C-CANCEL
read while its C-FIND is in progress, the peer's Maximum Length respected in every response,
a command on a context not for it, an association outlasting the stop's grace period; the
command set and file meta codecs against pynetdicom's."""

from __future__ import annotations

import datetime as dt
import signal
import socket
import struct
from io import BytesIO

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import build_context
from pynetdicom.dimse_messages import (
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_FIND_RQ,
    C_MOVE_RQ,
    C_STORE_RQ,
    DIMSEMessage,
)
from pynetdicom.dimse_primitives import C_CANCEL, C_ECHO, C_FIND, C_MOVE, C_STORE
from pynetdicom.dsutils import create_file_meta, decode, encode, encode_file_meta
from pynetdicom.pdu_primitives import P_DATA

from ricord_archive.dimse.commands import decode_command, encode_command
from ricord_archive.dimse.messages import part10
from ricord_archive.dimse.retrieve import data_set_bytes
from tests import dcmtk
from tests.conftest import Archive
from tests.phi_corpus import PhiCorpus

DEADLINE = 30.0
VERIFICATION, STUDY_FIND = "1.2.840.10008.1.1", "1.2.840.10008.5.1.4.1.2.2.1"
CT_STORAGE, EXPLICIT_LE = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"
A_ASSOCIATE_AC, P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x02, 0x04, 0x05, 0x06, 0x07
CONTEXTS = {1: VERIFICATION, 3: STUDY_FIND, 5: CT_STORAGE}


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Archive:
    base = tmp_path_factory.mktemp("association")
    archive = Archive(base / "data", base / "archive.log").start()
    yield archive
    archive.stop()


@pytest.fixture(scope="module")
def study(archive, tmp_path_factory) -> list[pydicom.Dataset]:
    """Three CT slices of one study, stored with storescu."""
    corpus = PhiCorpus(seed=13, out_dir=tmp_path_factory.mktemp("association-corpus"))
    files = corpus.study(corpus.patient(), dt.date(2022, 5, 6), slices=3)
    assert dcmtk.storescu(archive.dimse_port, files).returncode == 0
    return [pydicom.dcmread(f) for f in files]


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">LBB", len(data) + 2, context_id, control) + data


def associate_rq(max_pdu: int) -> bytes:
    contexts = b"".join(
        item(0x20, bytes([cid, 0, 0, 0]) + item(0x30, uid.encode()) + item(0x40, EXPLICIT_LE
                                                                           .encode()))
        for cid, uid in CONTEXTS.items()
    )
    body = (
        struct.pack(">HH", 1, 0) + b"RICORD".ljust(16) + b"RAWSCU".ljust(16) + bytes(32)
        + item(0x10, b"1.2.840.10008.3.1.1.1") + contexts
        + item(0x50, item(0x51, struct.pack(">L", max_pdu)))
    )
    return pdu(0x01, body)


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("closed by the archive")
        data += chunk
    return data


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = recv_exactly(sock, 6)
    return header[0], recv_exactly(sock, struct.unpack(">L", header[2:])[0])


def associated(archive: Archive, max_pdu: int = 0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", archive.dimse_port), timeout=DEADLINE)
    sock.sendall(associate_rq(max_pdu))
    pdu_type, _ = read_pdu(sock)
    assert pdu_type == A_ASSOCIATE_AC
    return sock


def release(sock: socket.socket) -> None:
    sock.sendall(pdu(A_RELEASE_RQ, bytes(4)))
    assert read_pdu(sock)[0] == A_RELEASE_RP
    sock.close()


def encoded(message: type[DIMSEMessage], primitive) -> tuple[bytes, bytes]:
    """A message's command set and data set, encoded (pynetdicom)."""
    msg = message()
    msg.primitive_to_message(primitive)
    fragments = [d.presentation_data_value_list[0][1] for d in msg.encode_msg(1, 0)]
    return fragments[0][1:], b"".join(f[1:] for f in fragments[1:])


def responses(sock: socket.socket, count: int) -> tuple[list[Dataset], list[int]]:
    """`count` DIMSE messages from the archive (command sets, identifiers decoded), and the
    length of every P-DATA-TF PDU they came in."""
    messages, lengths = [], []
    message = DIMSEMessage()
    while len(messages) < count:
        pdu_type, body = read_pdu(sock)
        assert pdu_type == P_DATA_TF
        lengths.append(len(body))
        offset = 0
        while offset < len(body):
            length, context_id = struct.unpack_from(">LB", body, offset)
            data = P_DATA()
            data.presentation_data_value_list = [[context_id, body[offset + 5:offset + 4 + length]]]
            offset += 4 + length
            if message.decode_msg(data):
                messages.append(message)
                message = DIMSEMessage()
    return [m.message_to_primitive() for m in messages], lengths


def find_request(message_id: int, level: str = "STUDY", **keys: str) -> tuple[bytes, bytes]:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    request = C_FIND()
    request.MessageID = message_id
    request.AffectedSOPClassUID = STUDY_FIND
    request.Priority = 2
    request.Identifier = BytesIO(encode(identifier, False, True))
    return encoded(C_FIND_RQ, request)


def test_a_c_store_fragmented_over_many_pdvs_and_pdus(archive, study, tmp_path):
    """The command set in three fragments, each in a P-DATA-TF of its own; the data set in 40
    fragments, five to a P-DATA-TF."""
    corpus = PhiCorpus(seed=14, out_dir=tmp_path)
    dataset = pydicom.dcmread(corpus.study(corpus.patient(), dt.date(2022, 7, 8), slices=1)[0])
    request = C_STORE()
    request.MessageID = 9
    request.AffectedSOPClassUID = dataset.SOPClassUID
    request.AffectedSOPInstanceUID = dataset.SOPInstanceUID
    request.Priority = 2
    request.DataSet = BytesIO(encode(dataset, False, True))
    command, data = encoded(C_STORE_RQ, request)
    third, size = len(command) // 3 + 1, len(data) // 40 + 1
    commands = [command[i:i + third] for i in range(0, len(command), third)]
    pieces = [data[i:i + size] for i in range(0, len(data), size)]
    assert len(commands) == 3 and len(pieces) == 40
    sock = associated(archive)
    for n, piece in enumerate(commands):
        sock.sendall(pdu(P_DATA_TF, pdv(5, 0x03 if n == 2 else 0x01, piece)))
    for start in range(0, 40, 5):
        sock.sendall(pdu(P_DATA_TF, b"".join(
            pdv(5, 0x02 if n == 39 else 0x00, pieces[n]) for n in range(start, start + 5)
        )))
    [response], _ = responses(sock, 1)
    release(sock)
    assert (response.Status, response.MessageIDBeingRespondedTo) == (0x0000, 9)
    found = archive.client().search_for_studies(search_filters={"PatientID": ""})
    assert len(found) == 2  # the module's study, and this one


def test_a_c_cancel_read_while_its_c_find_is_in_progress(archive, study):
    """The C-CANCEL arrives with the C-FIND it cancels: the find answers Cancel, no match."""
    command, identifier = find_request(7, StudyInstanceUID="")
    cancel = C_CANCEL()
    cancel.MessageIDBeingRespondedTo = 7
    cancel_command, _ = encoded(C_CANCEL_RQ, cancel)
    sock = associated(archive)
    sock.sendall(pdu(P_DATA_TF, pdv(3, 0x03, command) + pdv(3, 0x02, identifier))
                 + pdu(P_DATA_TF, pdv(3, 0x03, cancel_command)))
    [final], _ = responses(sock, 1)
    assert (final.Status, final.MessageIDBeingRespondedTo) == (0xFE00, 7)
    # the association goes on: the same query, not cancelled, finds the study
    command, identifier = find_request(8, StudyInstanceUID="")
    sock.sendall(pdu(P_DATA_TF, pdv(3, 0x03, command) + pdv(3, 0x02, identifier)))
    statuses = []
    while not statuses or statuses[-1] == 0xFF00:
        [answer], _ = responses(sock, 1)
        statuses.append(answer.Status)
    release(sock)
    assert statuses[-1] == 0x0000 and len(statuses) >= 2


def test_responses_respect_the_peer_maximum_length(archive, study):
    """A peer accepting P-DATA-TF PDUs of 64 bytes: every response comes in PDUs no longer,
    and decodes to what was asked."""
    sock = associated(archive, max_pdu=64)
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = VERIFICATION
    command, _ = encoded(C_ECHO_RQ, echo)
    sock.sendall(pdu(P_DATA_TF, pdv(1, 0x03, command)))
    [echoed], echo_lengths = responses(sock, 1)
    command, identifier = find_request(
        2, StudyInstanceUID="", PatientID="", ModalitiesInStudy="",
        NumberOfStudyRelatedInstances="", NumberOfStudyRelatedSeries="",
    )
    sock.sendall(pdu(P_DATA_TF, pdv(3, 0x03, command) + pdv(3, 0x02, identifier)))
    found, find_lengths = [], []
    while not found or found[-1].Status == 0xFF00:
        [answer], lengths = responses(sock, 1)
        found.append(answer)
        find_lengths += lengths
    release(sock)
    assert echoed.Status == 0x0000
    assert max(echo_lengths + find_lengths) <= 64
    *pending, final = found
    assert pending and final.Status == 0x0000
    assert len(find_lengths) > 2 * len(found)  # each answer needed several PDUs
    answers = [decode(p.Identifier, False, True) for p in pending]
    assert study[0].PatientID not in {a.PatientID for a in answers}  # the pseudonym only
    assert [a.ModalitiesInStudy for a in answers] == ["CT"] * len(answers)
    assert 3 in {a.NumberOfStudyRelatedInstances for a in answers}


@pytest.mark.parametrize("context_id", [99, 3], ids=["never-accepted", "query-context"])
def test_a_command_on_a_context_not_for_it_is_aborted(archive, study, context_id):
    """A C-ECHO on a context that was never accepted, or on the C-FIND context."""
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = VERIFICATION
    command, _ = encoded(C_ECHO_RQ, echo)
    sock = associated(archive)
    with sock:
        sock.sendall(pdu(P_DATA_TF, pdv(context_id, 0x03, command)))
        assert read_pdu(sock)[0] == A_ABORT
    assert dcmtk.echoscu(archive.dimse_port).returncode == 0


@pytest.mark.parametrize("message", ["store", "find", "move"])
def test_command_sets_match_pynetdicom(message):
    """The archive's command codec and pynetdicom's (through pydicom) agree both ways."""
    if message == "store":
        primitive, cls, fields = C_STORE(), C_STORE_RQ, {
            "CommandField": 0x0001, "MessageID": 3, "Priority": 2,
            "AffectedSOPClassUID": CT_STORAGE, "AffectedSOPInstanceUID": "2.25.12345",
        }
        primitive.DataSet = BytesIO(b"\x08\x00\x16\x00")
    elif message == "find":
        primitive, cls, fields = C_FIND(), C_FIND_RQ, {
            "CommandField": 0x0020, "MessageID": 65535, "Priority": 0,
            "AffectedSOPClassUID": STUDY_FIND,
        }
        primitive.Identifier = BytesIO(b"\x08\x00\x52\x00")
    else:
        primitive, cls, fields = C_MOVE(), C_MOVE_RQ, {
            "CommandField": 0x0021, "MessageID": 1, "Priority": 1,
            "AffectedSOPClassUID": "1.2.840.10008.5.1.4.1.2.2.2", "MoveDestination": "DEST",
        }
        primitive.Identifier = BytesIO(b"\x08\x00\x52\x00")
    for keyword, value in fields.items():
        if keyword != "CommandField":
            setattr(primitive, keyword, value)
    theirs, _ = encoded(cls, primitive)
    assert decode_command(theirs) == {**fields, "CommandDataSetType": 0x0001}
    ours = encode_command(fields, has_dataset=True)
    assert decode(BytesIO(ours), True, True) == decode(BytesIO(theirs), True, True)


def test_a_c_get_sends_the_stored_data_set_unparsed(tmp_path):
    """What follows the file meta of a Part 10 file, byte for byte; None for other layouts."""
    corpus = PhiCorpus(seed=15, out_dir=tmp_path)
    path = corpus.study(corpus.patient(), dt.date(2022, 9, 10), slices=1)[0]
    data = path.read_bytes()
    dataset = pydicom.dcmread(path)
    assert data_set_bytes(data) == encode(dataset, False, True)
    assert data_set_bytes(data[:128] + b"XXXX" + data[132:]) is None
    assert data_set_bytes(data[:150]) is None  # the file meta cut short


@pytest.mark.parametrize("syntax", [EXPLICIT_LE, "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50"])
@pytest.mark.parametrize("sop_uid", ["2.25.1234", "2.25.12345"])  # odd and even lengths
def test_the_part10_file_meta_is_pynetdicoms(syntax, sop_uid):
    context = build_context(CT_STORAGE, syntax)
    meta = create_file_meta(sop_class_uid=CT_STORAGE, sop_instance_uid=sop_uid,
                            transfer_syntax=context.transfer_syntax[0])
    expected = b"\x00" * 128 + b"DICM" + encode_file_meta(meta) + b"DATA"
    assert part10(CT_STORAGE, sop_uid, context, b"DATA") == expected


def test_a_stop_aborts_an_association_that_outlasts_the_grace_period(make_archive):
    archive = make_archive("grace", "[server]\nprocesses = 1\n[limits]\nshutdown_grace = 1\n")
    with associated(archive) as held:  # associated, then silent
        archive.process.send_signal(signal.SIGTERM)
        assert read_pdu(held)[0] == A_ABORT
    assert archive.process.wait(timeout=120) == 0
