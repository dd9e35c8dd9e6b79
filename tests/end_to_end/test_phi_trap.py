"""The PHI-trap corpus end to end: nothing planted survives, and what must survive does.

One archive run (module fixture): half the trap corpus over DIMSE (DCMTK storescu), half over
STOW-RS (dicomweb-client), then QIDO-RS, C-FIND, WADO-RS study retrieval and /metadata, then the
archive is stopped. The tests scan every file under its data directory (blobs, PostgreSQL's data
files and WAL), its log and every response for the planted values, and check the retrieved
objects against their originals.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from tests import dcmtk, load
from tests.conftest import Archive
from tests.phi_trap import PhiTrap

pytestmark = pytest.mark.slow  # a server process, DCMTK

SEED = 20260301
MULTIPART_DICOM = 'multipart/related; type="application/dicom"'
ARCHIVE_BLOCK = (0x0013, "RSNA")  # the archive's own private block


@dataclass
class TrapRun:
    trap: PhiTrap
    archive: Archive
    originals: dict[int, Dataset]  # by InstanceNumber, unique in the corpus
    retrieved: dict[int, Dataset] = field(default_factory=dict)
    retrieved_bytes: dict[int, bytes] = field(default_factory=dict)
    responses: list[bytes] = field(default_factory=list)


# --- scanning ------------------------------------------------------------------------------


def needles(planted: set[str]) -> set[bytes]:
    """Each planted value of 4 characters or more, and each component of a person name."""
    values = {v for v in planted if len(v) >= 4}
    for value in planted:
        values.update(part for part in value.split("^") if len(part) >= 4)
    return {v.encode() for v in values}


def hits(blob: bytes, wanted: set[bytes]) -> set[bytes]:
    return {n for n in wanted if n in blob}


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


# --- the run -------------------------------------------------------------------------------


def build(trap: PhiTrap) -> tuple[list[Path], list[Path]]:
    """Two patients over 89, each a CT series and an Enhanced CT: one by DIMSE, one by STOW."""
    halves = []
    for age, day in (("097Y", dt.date(2021, 3, 10)), ("093Y", dt.date(2021, 5, 20))):
        study = trap.study(trap.patient(age), day)
        halves.append([*trap.ct_series(study), trap.enhanced_ct(study)])
    return halves[0], halves[1]


def recording_session(responses: list[bytes]) -> requests.Session:
    """A requests session that keeps every HTTP response body it receives."""
    session = requests.Session()
    session.hooks["response"].append(lambda response, *_, **__: responses.append(response.content))
    return session


def multipart_parts(response: requests.Response) -> list[bytes]:
    boundary = response.headers["Content-Type"].split("boundary=")[1].strip('"').encode()
    chunks = response.content.split(b"--" + boundary)[1:-1]
    return [chunk.split(b"\r\n\r\n", 1)[1][:-2] for chunk in chunks]


def ingest(run: TrapRun, dimse_files: list[Path], stow_files: list[Path],
           client: DICOMwebClient) -> None:
    stored = dcmtk.storescu(run.archive.dimse_port, dimse_files)
    assert stored.stderr.count("(Success)") == len(dimse_files), stored.stderr
    run.responses.append(stored.stdout.encode() + stored.stderr.encode())
    client.store_instances([pydicom.dcmread(f) for f in stow_files])


def query(run: TrapRun, client: DICOMwebClient, find_dir: Path) -> list[str]:
    studies = client.search_for_studies()
    client.search_for_studies(search_filters={"PatientName": "*"}, get_remaining=True)
    found = dcmtk.findscu(run.archive.dimse_port, find_dir, {
        "PatientName": "", "PatientID": "", "AccessionNumber": "", "StudyDate": "",
        "ReferringPhysicianName": "", "StudyDescription": "", "PatientBirthDate": "",
        "InstitutionName": "", "StudyID": "", "PatientAge": "", "StudyInstanceUID": "",
    })
    run.responses.extend(p.read_bytes() for p in find_dir.glob("rsp*.dcm"))
    assert len(found) == len(studies) == 2
    return [s["0020000D"]["Value"][0] for s in studies]


def retrieve(run: TrapRun, session: requests.Session, study_uids: list[str]) -> None:
    url = run.archive.dicomweb_url
    for study_uid in study_uids:
        response = session.get(f"{url}/studies/{study_uid}", headers={"Accept": MULTIPART_DICOM})
        assert response.status_code == 200
        for part in multipart_parts(response):
            ds = pydicom.dcmread(BytesIO(part))
            run.retrieved[int(ds.InstanceNumber)] = ds
            run.retrieved_bytes[int(ds.InstanceNumber)] = part
        metadata = session.get(f"{url}/studies/{study_uid}/metadata",
                               headers={"Accept": "application/dicom+json"})
        assert metadata.status_code == 200
    assert sorted(run.retrieved) == sorted(run.originals)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Iterator[TrapRun]:
    base = tmp_path_factory.mktemp("phi-trap")
    trap = PhiTrap(SEED, base / "corpus")
    dimse_files, stow_files = build(trap)
    originals = {int(ds.InstanceNumber): ds for ds in map(pydicom.dcmread, trap.files)}
    archive = Archive(base / "data", base / "archive.log")
    result = TrapRun(trap, archive, originals)
    session = recording_session(result.responses)
    client = DICOMwebClient(archive.dicomweb_url, session=session)
    try:
        archive.start()
        ingest(result, dimse_files, stow_files, client)
        study_uids = query(result, client, base / "find")
        retrieve(result, session, study_uids)
        assert archive.stop() == 0  # PostgreSQL checkpointed and stopped: its files are final
        yield result
    finally:
        if archive.process is not None and archive.process.poll() is None:
            archive.stop()


# --- no planted value anywhere -------------------------------------------------------------


def test_the_scanner_finds_every_planted_value_in_the_input(run):
    wanted = needles(run.trap.planted)
    assert len(wanted) > 300
    sent = b"".join(p.read_bytes() for p in run.trap.files)
    assert hits(sent, wanted) == wanted


def test_no_planted_value_is_stored_logged_or_answered(run):
    wanted = needles(run.trap.planted)
    scanned = [*files_under(run.archive.data_dir), run.archive.log_path]
    leaks = {str(p): hits(p.read_bytes(), wanted) for p in scanned}
    leaks |= {f"response {n}": hits(body, wanted) for n, body in enumerate(run.responses)}
    assert {where: found for where, found in leaks.items() if found} == {}
    assert load.stored_blobs(run.archive.data_dir)
    assert any((run.archive.data_dir / "pg" / "data" / "pg_wal").iterdir())
    assert len(run.responses) >= 8  # STOW, QIDO, C-FIND, WADO and metadata answers


# --- what the retrieved objects must look like ---------------------------------------------


def test_ages_over_89_come_back_as_090y(run):
    assert {o.PatientAge for o in run.originals.values()} == {"097Y", "093Y"}
    assert {ds.PatientAge for ds in run.retrieved.values()} == {"090Y"}


def test_no_curve_overlay_or_private_group_but_the_archives_own(run):
    for ds in run.retrieved.values():
        tags = [element.tag for element in ds]
        groups = {tag.group for tag in tags}
        assert not {g for g in groups if g >> 8 in (0x50, 0x60)}
        assert {g for g in groups if g % 2} == {ARCHIVE_BLOCK[0]}
        assert ds[0x00130010].value == ARCHIVE_BLOCK[1]
        assert [t for t in tags if t.group == 0x0013] == [0x00130010, 0x00131001, 0x00131003]


def test_no_private_element_nested_in_a_sequence(run):
    def walk(dataset: Dataset) -> Iterator[DataElement]:
        for element in dataset:
            yield element
            if element.VR == "SQ":
                for item in element.value:
                    yield from walk(item)

    for ds in run.retrieved.values():
        nested = [e.tag for e in walk(ds) if e.tag.is_private and e.tag.group != 0x0013]
        assert nested == []


def test_timezone_offset_is_removed(run):
    assert all("TimezoneOffsetFromUTC" in o for o in run.originals.values())
    assert not any("TimezoneOffsetFromUTC" in ds for ds in run.retrieved.values())


def day_offset(original: Dataset, new: Dataset) -> int:
    parse = dt.datetime.strptime
    return (parse(new.StudyDate, "%Y%m%d") - parse(original.StudyDate, "%Y%m%d")).days


def frame_contents(ds: Dataset) -> list[Dataset]:
    return [content for group in ("SharedFunctionalGroupsSequence",
                                  "PerFrameFunctionalGroupsSequence")
            for item in ds[group].value for content in item.FrameContentSequence]


def shifted(value: str, days: int) -> str:
    moved = dt.datetime.strptime(value[:8], "%Y%m%d") + dt.timedelta(days=days)
    return moved.strftime("%Y%m%d") + value[8:]


def test_functional_group_datetimes_move_with_the_study_date(run):
    enhanced = [n for n, o in run.originals.items() if "PerFrameFunctionalGroupsSequence" in o]
    assert len(enhanced) == 2
    for number in enhanced:
        original, new = run.originals[number], run.retrieved[number]
        days = day_offset(original, new)
        assert days < 0
        assert new.AcquisitionDateTime == shifted(original.AcquisitionDateTime, days)
        pairs = list(zip(frame_contents(original), frame_contents(new), strict=True))
        assert len(pairs) == 3  # the shared group's and each frame's
        for before, after in pairs:
            for keyword in ("FrameAcquisitionDateTime", "FrameReferenceDateTime"):
                assert after[keyword].value == shifted(before[keyword].value, days)
            assert "FrameComments" not in after


def test_uids_are_remapped_even_multi_valued_and_unlisted(run):
    keywords = ("CreatorVersionUID", "VolumeFrameOfReferenceUID", "TableFrameOfReferenceUID",
                "SOPInstanceUIDOfConcatenationSource")
    for number, ds in run.retrieved.items():
        original = run.originals[number]
        assert len(ds.IrradiationEventUID) == 2
        for before, after in zip(original.IrradiationEventUID, ds.IrradiationEventUID,
                                 strict=True):
            assert after.startswith("2.25.") and after != before
        for keyword in keywords:
            assert ds[keyword].value.startswith("2.25."), keyword


def test_file_meta_and_preamble_are_rebuilt(run):
    for number, data in run.retrieved_bytes.items():
        ds = run.retrieved[number]
        assert data[:128] == b"\x00" * 128 and data[128:132] == b"DICM"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert "SourceApplicationEntityTitle" not in ds.file_meta


def test_pixel_data_is_byte_identical(run):
    for number, ds in run.retrieved.items():
        assert ds.PixelData == run.originals[number].PixelData
