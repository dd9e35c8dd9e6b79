"""C-GET and C-MOVE SCP: DCMTK's getscu and movescu pull at patient, study, series and image
level (Study Root and Patient Root) and receive the stored bytes; compressed objects are sent
as stored or decompressed, as the peer accepts; unknown move destinations, cancels, failed
sub-operations and bad identifiers, with pynetdicom as the peer where DCMTK cannot be."""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from tests import dcmtk, load
from tests.conftest import Archive, every_instance, free_port
from tests.phi_corpus import PhiCorpus

pytestmark = pytest.mark.slow  # C-GET and C-MOVE against a server process, DCMTK

LARGE_SERIES = 40


@dataclass(frozen=True)
class Stored:
    """The de-identified UIDs of what the archive holds, and its stored data sets by SOP UID."""

    patient_id: str  # of the patient with two studies
    studies: dict[str, dict[str, list[str]]]  # study -> series -> SOP instances, in order
    first_study: str
    second_study: str
    large_series: tuple[str, str]  # study, series
    j2k: tuple[str, str, str]
    bodies: dict[str, bytes]


@pytest.fixture(scope="module")
def destinations() -> dict[str, int]:
    """Move destination AE titles and their ports on 127.0.0.1."""
    return {"MOVESCU": free_port(), "PYMOVE": free_port()}


@pytest.fixture(scope="module")
def move_port(destinations) -> int:
    return destinations["MOVESCU"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory, destinations) -> Archive:
    base = tmp_path_factory.mktemp("retrieve")
    config = base / "config.toml"
    config.write_text("".join(
        f'[[move_destinations]]\naet = "{aet}"\nhost = "127.0.0.1"\nport = {port}\n'
        for aet, port in destinations.items()
    ))
    archive = Archive(base / "data", base / "archive.log", config).start()
    yield archive
    archive.stop()


def body(data: bytes) -> bytes:
    """The data set of a Part 10 file: what follows the preamble and the file meta."""
    assert data[128:132] == b"DICM"
    return data[144 + int.from_bytes(data[140:144], "little"):]


def sop_uid(source: Path | BytesIO) -> str:
    return str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)


@pytest.fixture(scope="module")
def stored(archive, tmp_path_factory) -> Stored:
    corpus = PhiCorpus(seed=88, out_dir=tmp_path_factory.mktemp("corpus"))
    patient = corpus.patient()
    files = corpus.study(patient, dt.date(2020, 4, 4), slices=3)
    files += corpus.study(patient, dt.date(2021, 5, 5), slices=2)
    files += corpus.study(corpus.patient(), dt.date(2022, 6, 6), slices=LARGE_SERIES)
    assert "(Success)" in dcmtk.storescu(archive.dimse_port, files).stderr
    j2k = pydicom.dcmread(get_testdata_file("693_J2KI.dcm"))  # JPEG 2000, stored as sent
    [j2k_item] = archive.client().store_instances([j2k]).ReferencedSOPSequence
    studies: dict[str, dict[str, list[str]]] = {}
    patients: dict[str, str] = {}
    for found in every_instance(archive.client()):
        study, series, sop = (found[t]["Value"][0] for t in ("0020000D", "0020000E", "00080018"))
        studies.setdefault(study, {}).setdefault(series, []).append(sop)
        patients[study] = found["00100020"]["Value"][0]
    by_size = sorted(studies, key=lambda s: sum(len(v) for v in studies[s].values()))
    large = by_size[-1]
    two = [s for s in studies if list(patients.values()).count(patients[s]) == 2]
    first, second = sorted(two, key=lambda s: -sum(len(v) for v in studies[s].values()))
    j2k_study = next(s for s in studies if j2k_item.ReferencedSOPInstanceUID in
                     [u for v in studies[s].values() for u in v])
    [(j2k_series, _)] = studies[j2k_study].items()
    bodies = {}
    for data in load.stored_blobs(archive.data_dir).values():
        bodies[sop_uid(BytesIO(data))] = body(data)
    return Stored(
        patients[first], studies, first, second, (large, next(iter(studies[large]))),
        (j2k_study, j2k_series, j2k_item.ReferencedSOPInstanceUID), bodies,
    )


def instances(stored: Stored, study: str) -> list[str]:
    return [u for series in stored.studies[study].values() for u in series]


def received(folder: Path) -> dict[str, Path]:
    return {sop_uid(p): p for p in folder.iterdir() if p.is_file()}


def keys(level: str, **values: str) -> list[str]:
    args = ["-k", f"QueryRetrieveLevel={level}"]
    for key, value in values.items():
        args += ["-k", f"{key}={value}"]
    return args


def cases(stored: Stored) -> dict[str, tuple[str, list[str], list[str]]]:
    """name -> (information model flag, identifier keys, the SOP instances expected)."""
    first = instances(stored, stored.first_study)
    [series] = stored.studies[stored.first_study]
    return {
        "study root, study": ("-S", keys("STUDY", StudyInstanceUID=stored.first_study), first),
        "study root, series": ("-S", keys(
            "SERIES", StudyInstanceUID=stored.first_study, SeriesInstanceUID=series), first),
        "study root, two images": ("-S", keys(
            "IMAGE", StudyInstanceUID=stored.first_study, SeriesInstanceUID=series,
            SOPInstanceUID="\\".join(first[:2])), first[:2]),
        "patient root, patient": ("-P", keys("PATIENT", PatientID=stored.patient_id),
                                  first + instances(stored, stored.second_study)),
        "patient root, study": ("-P", keys(
            "STUDY", PatientID=stored.patient_id, StudyInstanceUID=stored.second_study),
            instances(stored, stored.second_study)),
    }


CASES = ["study root, study", "study root, series", "study root, two images",
         "patient root, patient", "patient root, study"]


@pytest.mark.parametrize("case", CASES)
def test_getscu_receives_the_stored_bytes(archive, stored, tmp_path, case):
    model, identifier, expected = cases(stored)[case]
    result = dcmtk.run("getscu", "-v", "+B", model, "-aet", "GETSCU", "-aec", "RICORD",
                       "-od", str(tmp_path), "127.0.0.1", str(archive.dimse_port), *identifier,
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"Number of Completed Suboperations : {len(expected)}" in result.stderr
    got = received(tmp_path)
    assert sorted(got) == sorted(expected)
    for uid, path in got.items():
        assert body(path.read_bytes()) == stored.bodies[uid]


@pytest.mark.parametrize("case", CASES)
def test_movescu_receives_the_stored_bytes(archive, stored, move_port, tmp_path, case):
    model, identifier, expected = cases(stored)[case]
    result = dcmtk.run("movescu", "-v", "+B", model, "-aet", "MOVESCU", "-aec", "RICORD",
                       "+P", str(move_port), "-od", str(tmp_path), "127.0.0.1",
                       str(archive.dimse_port), *identifier, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Received Final Move Response (Success)" in result.stderr
    assert result.stderr.count("Received Move Response") == len(expected)  # pending, counted
    got = received(tmp_path)
    assert sorted(got) == sorted(expected)
    for uid, path in got.items():
        assert body(path.read_bytes()) == stored.bodies[uid]


@pytest.mark.parametrize(("tool", "prefer", "as_stored"), [
    ("getscu", [], False),  # uncompressed only: decompressed for the peer
    # getscu offers JPEG 2000 and the uncompressed syntaxes in one presentation context, and
    # the archive, as the acceptor, picks uncompressed there (as for every C-STORE it takes)
    ("getscu", ["+xw"], False),
    ("movescu", [], False),  # the archive proposes JPEG 2000 apart: movescu refuses it
    ("movescu", ["+xw"], True),  # and accepts it: the stored bytes
])
def test_compressed_objects_as_stored_or_decompressed(
    archive, stored, move_port, tmp_path, tool, prefer, as_stored
):
    study, series, sop = stored.j2k
    move = ["-aet", "MOVESCU", "+P", str(move_port)] if tool == "movescu" else []
    result = dcmtk.run(tool, "-v", "+B", "-S", *prefer, *move, "-aec", "RICORD", "-od",
                       str(tmp_path), "127.0.0.1", str(archive.dimse_port),
                       *keys("IMAGE", StudyInstanceUID=study, SeriesInstanceUID=series,
                             SOPInstanceUID=sop), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [(uid, path)] = received(tmp_path).items()
    assert uid == sop
    got = pydicom.dcmread(path)
    original = pydicom.dcmread(get_testdata_file("693_J2KI.dcm"))
    if as_stored:
        assert body(path.read_bytes()) == stored.bodies[sop]
        assert got.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    else:
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert np.array_equal(got.pixel_array, pixel_array(get_testdata_file("693_J2KI.dcm")))


def test_c_get_offering_the_stored_syntax_apart_receives_the_stored_bytes(archive, stored):
    study, series, sop = stored.j2k
    j2k = pydicom.dcmread(get_testdata_file("693_J2KI.dcm")).file_meta.TransferSyntaxUID
    got: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        got.append(event.dataset)
        got[-1].file_meta = event.file_meta
        return 0x0000

    association = _get_association(archive, on_store, syntaxes=[[j2k], [ExplicitVRLittleEndian]])
    try:
        [*_, (final, _)] = association.send_c_get(
            _identifier("IMAGE", StudyInstanceUID=study, SeriesInstanceUID=series,
                        SOPInstanceUID=sop), StudyRootQueryRetrieveInformationModelGet,
        )
    finally:
        association.release()
    assert final.Status == 0x0000
    [dataset] = got
    assert dataset.file_meta.TransferSyntaxUID == j2k
    stored_copy = pydicom.dcmread(BytesIO(next(
        d for d in load.stored_blobs(archive.data_dir).values() if sop_uid(BytesIO(d)) == sop)))
    assert dataset.PixelData == stored_copy.PixelData


def test_unknown_move_destination_is_a801(archive, stored):
    result = dcmtk.run("movescu", "-d", "-S", "-aet", "MOVESCU", "-aem", "NOWHERE", "-aec",
                       "RICORD", "127.0.0.1", str(archive.dimse_port),
                       *keys("STUDY", StudyInstanceUID=stored.first_study))
    assert "0xa801" in result.stderr.lower(), result.stderr
    assert "Refused: MoveDestinationUnknown" in result.stderr


def _get_association(archive: Archive, on_store, model=StudyRootQueryRetrieveInformationModelGet,
                     syntaxes=(ExplicitVRLittleEndian,), sop_class=CTImageStorage):
    """A C-GET requestor taking `sop_class` in each of `syntaxes` (a context each)."""
    ae = AE(ae_title="PYGET")
    ae.add_requested_context(model)
    for offered in syntaxes:
        ae.add_requested_context(sop_class, offered)
    association = ae.associate(
        "127.0.0.1", archive.dimse_port, ae_title="RICORD",
        ext_neg=[build_role(sop_class, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert association.is_established
    return association


def _identifier(level: str, **values: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for key, value in values.items():
        setattr(identifier, key, value)
    return identifier


def test_c_cancel_stops_a_c_get_of_a_large_series(archive, stored):
    study, series = stored.large_series
    cancelled = threading.Event()
    got: list[str] = []

    def on_store(event: evt.Event) -> int:
        if got:  # hold the second object until the C-CANCEL is on its way
            assert cancelled.wait(30)
        got.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    association = _get_association(archive, on_store)
    try:
        responses = association.send_c_get(
            _identifier("SERIES", StudyInstanceUID=study, SeriesInstanceUID=series),
            StudyRootQueryRetrieveInformationModelGet, msg_id=7,
        )
        statuses = []
        for status, _ in responses:
            statuses.append(status)
            if status.Status == 0xFF00 and not cancelled.is_set():
                association.send_c_cancel(7, query_model=StudyRootQueryRetrieveInformationModelGet)
                cancelled.set()
    finally:
        association.release()
    final = statuses[-1]
    assert final.Status == 0xFE00
    assert final.NumberOfRemainingSuboperations == LARGE_SERIES - len(got)
    assert final.NumberOfCompletedSuboperations == len(got) == 2


def test_pending_counts_and_failed_instances_in_the_final_status(archive, stored):
    expected = instances(stored, stored.first_study)
    refused = expected[1]

    def on_store(event: evt.Event) -> int:
        return 0xA700 if event.request.AffectedSOPInstanceUID == refused else 0x0000

    association = _get_association(archive, on_store)
    try:
        responses = list(association.send_c_get(
            _identifier("STUDY", StudyInstanceUID=stored.first_study),
            StudyRootQueryRetrieveInformationModelGet,
        ))
    finally:
        association.release()
    pending = [s for s, _ in responses if s.Status == 0xFF00]
    assert [s.NumberOfRemainingSuboperations for s in pending] == [2, 1, 0]
    assert [s.NumberOfFailedSuboperations for s in pending] == [0, 1, 1]
    final, identifier = responses[-1]
    assert final.Status == 0xB000
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (2, 1)
    assert identifier.FailedSOPInstanceUIDList == refused


def test_instances_the_peer_cannot_take_fail_and_are_listed(archive, stored):
    association = _get_association(archive, lambda event: 0x0000, sop_class=MRImageStorage)
    try:
        [*pending, (final, identifier)] = association.send_c_get(
            _identifier("STUDY", StudyInstanceUID=stored.second_study),
            StudyRootQueryRetrieveInformationModelGet,
        )
    finally:
        association.release()
    assert len(pending) == 2
    assert final.Status == 0xA702  # every sub-operation failed
    assert final.NumberOfFailedSuboperations == 2
    assert sorted(identifier.FailedSOPInstanceUIDList) == sorted(
        instances(stored, stored.second_study))


STUDY_ROOT, PATIENT_ROOT = (StudyRootQueryRetrieveInformationModelGet,
                            PatientRootQueryRetrieveInformationModelGet)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize(("model", "level", "keys", "status"), [
    (STUDY_ROOT, "PATIENT", {"PatientID": "X"}, 0xA900),  # Study Root has no PATIENT level
    # a retrieve names its level's unique key, without wildcards
    (STUDY_ROOT, "STUDY", {}, 0xA900),
    (STUDY_ROOT, "STUDY", {"StudyInstanceUID": "2.25.*"}, 0xA900),
    (PATIENT_ROOT, "PATIENT", {"PatientID": "*"}, 0xA900),
    (STUDY_ROOT, "FRAME", {"StudyInstanceUID": "2.25.1"}, 0xA900),
    (STUDY_ROOT, "STUDY", {"StudyInstanceUID": "2.25.1"}, 0x0000),  # no match: nothing to send
])
def test_bad_or_empty_identifiers(archive, stored, model, level, keys, status):
    association = _get_association(archive, lambda event: 0x0000, model)
    try:
        responses = list(association.send_c_get(_identifier(level, **keys), model))
    finally:
        association.release()
    [(final, _)] = responses
    assert final.Status == status
    assert final.NumberOfCompletedSuboperations == 0


def test_c_move_with_a_bad_identifier_fails_without_moving(archive, stored, destinations):
    ae = AE(ae_title="PYMOVE")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    association = ae.associate("127.0.0.1", archive.dimse_port, ae_title="RICORD")
    assert association.is_established
    received_elsewhere: list[str] = []
    destination = AE(ae_title="PYMOVE")
    destination.add_supported_context("1.2.840.10008.1.1")
    destination.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
    server = destination.start_server(
        ("127.0.0.1", destinations["PYMOVE"]), block=False,
        evt_handlers=[(evt.EVT_C_STORE, lambda e: received_elsewhere.append("x") or 0)],
    )
    try:
        responses = list(association.send_c_move(
            _identifier("STUDY"), "PYMOVE", StudyRootQueryRetrieveInformationModelMove
        ))
    finally:
        association.release()
        server.shutdown()
    assert responses[-1][0].Status == 0xA900
    assert not received_elsewhere
