"""C-FIND conformance: Patient Root and Study Root, every level, with DCMTK's findscu (and
pynetdicom for C-CANCEL), against one running archive loaded with the QIDO-RS test corpus plus
one large series to cancel a query in."""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage
from pynetdicom import AE, Association, evt
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind as PATIENT_ROOT,
)
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT,
)

from tests import dcmtk
from tests.conftest import Archive, _stop_leftover_postgres
from tests.web.test_qido import (
    MODALITIES,
    PATIENT_ID,
    PLAN,
    SITE_B,
    SITES_CONFIG,
    SLICE_THICKNESS_MM,
    STUDY_TIME,
    STUDY_UID,
    PlannedStudy,
    first,
    load_corpus,
)

BULK = PlannedStudy("D1", "D", dt.date(2019, 2, 3), "120000", (("CT", 9, 250),), "PACS_A")
CFIND_PLAN = (*PLAN, BULK)
CALLING = "PACS_A"
ALWAYS = {"QueryRetrieveLevel", "SpecificCharacterSet"}  # in every response identifier


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Iterator[Archive]:
    base = tmp_path_factory.mktemp("cfind")
    config = base / "ricord-archive.toml"
    config.write_text(SITES_CONFIG)
    running = Archive(base / "data", base / "archive.log", config)
    try:
        running.start()
        load_corpus(running, base / "corpus", CFIND_PLAN)
        yield running
    finally:
        running.stop()
        _stop_leftover_postgres(running.data_dir)


@dataclass
class Studies:
    """The de-identified studies, as QIDO-RS lists them, by label of the plan."""

    documents: dict[str, dict]

    def uid(self, label: str) -> str:
        return first(self.documents[label], STUDY_UID)

    def pid(self, label: str) -> str:
        return first(self.documents[label], PATIENT_ID)

    def date(self, label: str) -> str:
        return first(self.documents[label], "00080020")


@pytest.fixture(scope="module")
def studies(archive) -> Studies:
    found = archive.client().search_for_studies()
    by_time = {first(s, STUDY_TIME): s for s in found}
    return Studies({p.label: by_time[p.time] for p in CFIND_PLAN})


# --- running findscu -------------------------------------------------------------------------


@dataclass
class Find:
    responses: list[Dataset]
    final: str  # findscu's text for the final status, e.g. "Success"
    output: str = ""  # findscu's log (with `-d`, every command set it received)

    def values(self, keyword: str) -> list[str]:
        return [str(r.get(keyword, "")) for r in self.responses]


def findscu(archive: Archive, tmp: Path, root: str, level: str, keys: list[str],
            verbosity: str = "-v") -> Find:
    """findscu with `-P` (Patient Root) or `-S` (Study Root); keys as findscu's `-k` takes them."""
    out = Path(tempfile.mkdtemp(prefix="find", dir=tmp))
    args = [verbosity, root, "-X", "-od", str(out), "-aet", CALLING, "-aec", "RICORD",
            "-k", f"QueryRetrieveLevel={level}"]
    for key in keys:
        args += ["-k", key]
    result = dcmtk.run("findscu", *args, "127.0.0.1", str(archive.dimse_port))
    assert result.returncode == 0, result.stderr
    output = result.stderr + result.stdout
    final = (re.search(r"Received Final Find Response \(([^)]*)\)", output)
             or re.search(r"DIMSE Status *: (0x[0-9a-f]{4}: [^\n]*)", output))
    assert final, result.stderr
    return Find([pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))], final.group(1),
                output)


def keyword_of(key: str) -> str:
    """The top-level keyword of a findscu key such as `PatientName=X` or `Seq[0].Keyword`."""
    return re.split(r"[=\[.]", key)[0]


def with_return_key(keys: list[str], keyword: str) -> list[str]:
    """`keys` plus `keyword` as a return key, unless a key already names it (findscu would let
    the later, empty `-k` replace the matching value)."""
    return keys if any(keyword_of(k) == keyword for k in keys) else [*keys, keyword]


def as_list(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def assert_echoes_exactly(find: Find, keys: list[str]) -> None:
    wanted = {keyword_of(k) for k in keys} | ALWAYS
    for response in find.responses:
        assert {e.keyword for e in response} == wanted
        assert response.SpecificCharacterSet == "ISO_IR 192"


# --- levels and matching ---------------------------------------------------------------------


PATIENT_KEYS = ["PatientID", "PatientName", "NumberOfPatientRelatedStudies",
                "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances"]


def test_patient_level_lists_each_patient_with_its_aggregates(archive, studies, tmp_path):
    find = findscu(archive, tmp_path, "-P", "PATIENT", PATIENT_KEYS)
    assert find.final == "Success"
    assert_echoes_exactly(find, PATIENT_KEYS)
    by_patient = {r.PatientID: r for r in find.responses}
    assert len(by_patient) == len(find.responses) == len({p.patient for p in CFIND_PLAN})
    for patient in {p.patient for p in CFIND_PLAN}:
        planned = [p for p in CFIND_PLAN if p.patient == patient]
        response = by_patient[studies.pid(planned[0].label)]
        assert str(response.PatientName) == response.PatientID
        assert response.NumberOfPatientRelatedStudies == len(planned)
        assert response.NumberOfPatientRelatedSeries == sum(len(p.series) for p in planned)
        assert response.NumberOfPatientRelatedInstances == sum(
            n for p in planned for _, _, n in p.series)


@pytest.mark.parametrize(("key", "patients"), [
    pytest.param(lambda s: f"PatientName={SITE_B}-*", ["B1"], id="PatientName *"),
    pytest.param(lambda s: f"PatientID={s.pid('A1')}", ["A1"], id="PatientID"),
    pytest.param(lambda s: f"PatientID=?{s.pid('C1')[1:]}", ["C1"], id="PatientID ?"),
    pytest.param(lambda s: f"ClinicalTrialSiteID={SITE_B}", ["B1"], id="ClinicalTrialSiteID"),
    pytest.param(lambda s: "PatientName=%*", [], id="PatientName % literal"),
    pytest.param(lambda s: "PatientBirthDate=19500101", [], id="removed PatientBirthDate"),
])
def test_patient_level_matching(archive, studies, tmp_path, key, patients):
    """`patients`: labels of a study of each patient expected."""
    find = findscu(archive, tmp_path, "-P", "PATIENT", with_return_key([key(studies)], "PatientID"))
    assert find.final == "Success"
    assert sorted(find.values("PatientID")) == sorted(studies.pid(label) for label in patients)


@pytest.mark.parametrize("root", ["-P", "-S"])
def test_study_level_matching(archive, studies, tmp_path, root):
    keys = ["StudyInstanceUID", "PatientID", "StudyDate", "StudyTime", "ModalitiesInStudy",
            "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "AccessionNumber"]
    everything = findscu(archive, tmp_path, root, "STUDY", keys)
    assert_echoes_exactly(everything, keys)
    assert sorted(everything.values("StudyInstanceUID")) == sorted(
        studies.uid(p.label) for p in CFIND_PLAN)
    for planned in CFIND_PLAN:
        [response] = [r for r in everything.responses
                      if r.StudyInstanceUID == studies.uid(planned.label)]
        assert response.StudyTime == planned.time
        assert response.NumberOfStudyRelatedSeries == len(planned.series)
        assert response.NumberOfStudyRelatedInstances == sum(n for _, _, n in planned.series)
        assert as_list(response.ModalitiesInStudy) == studies.documents[planned.label][
            MODALITIES]["Value"]
    a1, a2 = studies.date("A1"), studies.date("A2")
    # Other patients' dates are shifted by other offsets: a date range is checked on patient A.
    for matching, labels in (
        (f"StudyDate={a1}-{a2}", {"A1", "A2"}),
        (f"StudyDate={a2}-", {"A2"}),
        (f"StudyDate=-{a1}", {"A1"}),
        ("StudyTime=0800-1030", {"A1", "A2"}),
        (f"StudyInstanceUID={studies.uid('B1')}\\{studies.uid('C1')}", {"B1", "C1"}),
        ("ModalitiesInStudy=MR", {"A1", "C1"}),
        (f"AccessionNumber={first(studies.documents['A2'], '00080050')}", {"A2"}),
    ):
        find = findscu(archive, tmp_path, root, "STUDY", with_return_key(
            [matching, "PatientID"], "StudyInstanceUID"))
        found = set(find.values("StudyInstanceUID"))
        if matching.startswith("StudyDate"):
            found &= {studies.uid("A1"), studies.uid("A2")}
        assert found == {studies.uid(label) for label in labels}, matching


@pytest.mark.parametrize("root", ["-P", "-S"])
def test_series_level_matching(archive, studies, tmp_path, root):
    keys = ["SeriesInstanceUID", "Modality=MR", "SeriesNumber", "StudyInstanceUID",
            "NumberOfSeriesRelatedInstances", "PerformedProcedureStepStartTime"]
    find = findscu(archive, tmp_path, root, "SERIES", keys)
    assert find.final == "Success"
    assert_echoes_exactly(find, keys)
    assert {(r.StudyInstanceUID, int(r.SeriesNumber)) for r in find.responses} == {
        (studies.uid("A1"), 2), (studies.uid("C1"), 7)}
    assert {r.NumberOfSeriesRelatedInstances for r in find.responses} == {2, 1}
    numbered = findscu(archive, tmp_path, root, "SERIES", ["SeriesNumber=5", "Modality"])
    assert numbered.values("Modality") == ["CT"]
    scoped = findscu(archive, tmp_path, root, "SERIES", [
        f"StudyInstanceUID={studies.uid('A1')}", "Modality=?T", "SeriesNumber"])
    assert scoped.values("SeriesNumber") == ["1"]


@pytest.mark.parametrize("root", ["-P", "-S"])
def test_image_level_matching(archive, studies, tmp_path, root):
    keys = [f"PatientID={studies.pid('A1')}", "SOPInstanceUID", "InstanceNumber=2",
            f"SOPClassUID={MRImageStorage}", "StudyInstanceUID", "SeriesInstanceUID"]
    find = findscu(archive, tmp_path, root, "IMAGE", keys)
    assert find.final == "Success"
    assert_echoes_exactly(find, keys)
    assert find.values("StudyInstanceUID") == [studies.uid("A1")]  # only A1's MR has 2 images
    assert find.responses[0].SOPInstanceUID.startswith("2.25.")
    one = findscu(archive, tmp_path, root, "IMAGE", [
        f"SOPInstanceUID={find.responses[0].SOPInstanceUID}", "InstanceNumber", "Modality"])
    assert (one.values("InstanceNumber"), one.values("Modality")) == (["2"], ["MR"])


@pytest.mark.parametrize("root", ["-P", "-S"])
def test_an_image_level_query_naming_no_studies_fails_saying_how_to_narrow_it(
        archive, studies, tmp_path, root):
    """It would read every partition of the instance table: Refused (Out of Resources) with an
    Error Comment, and no match."""
    keys = ["SOPInstanceUID", "InstanceNumber=2", "Modality=MR", "StudyInstanceUID"]
    find = findscu(archive, tmp_path, root, "IMAGE", keys, verbosity="-d")
    assert find.responses == []
    assert find.final == "0xa700: Refused: Out of resources", find.output
    assert "(0000,0902) LO [instance search too broad: name its studies by StudyInsta" \
        in find.output
    narrowed = findscu(archive, tmp_path, root, "IMAGE", [f"StudyInstanceUID={studies.uid('A1')}",
                                                          *keys[1:3]])
    assert narrowed.final == "Success"
    assert narrowed.values("InstanceNumber") == ["2"]


def test_sequence_keys(archive, studies, tmp_path):
    universal = ["RequestAttributesSequence[0].RequestedProcedureID", "SeriesInstanceUID",
                 "Modality=MR"]
    find = findscu(archive, tmp_path, "-S", "SERIES", universal)
    assert find.final == "Success"
    assert len(find.responses) == 2
    assert_echoes_exactly(find, universal)
    for response in find.responses:  # de-identification removed the request identifiers
        assert not any(item.get("RequestedProcedureID") for item in
                       response.RequestAttributesSequence)
    valued = ["RequestAttributesSequence[0].RequestedProcedureID=REQ*", "SeriesInstanceUID"]
    assert findscu(archive, tmp_path, "-S", "SERIES", valued).responses == []


def test_image_level_return_keys_are_filled_from_the_whole_instance(archive, studies, tmp_path):
    keys = [f"StudyInstanceUID={studies.uid('A2')}", "InstanceNumber", "SliceThickness",
            "Manufacturer", "ImagePositionPatient", "Rows"]
    find = findscu(archive, tmp_path, "-P", "IMAGE", keys)
    assert_echoes_exactly(find, keys)
    assert sorted(int(r.InstanceNumber) for r in find.responses) == [1, 2]
    for response in find.responses:
        assert float(response.SliceThickness) == SLICE_THICKNESS_MM
        assert response.Manufacturer == "ACME MEDICAL"
        assert list(response.ImagePositionPatient) == [0, 0, int(response.InstanceNumber)]
        assert response.Rows == 16


def test_a_sequence_return_key_returns_items_reduced_to_the_requested_attributes(
        archive, studies, tmp_path):
    keys = [f"StudyInstanceUID={studies.uid('C1')}", "SOPInstanceUID",
            "DeidentificationMethodCodeSequence[0].CodeValue"]
    [response] = findscu(archive, tmp_path, "-S", "IMAGE", keys).responses
    items = response.DeidentificationMethodCodeSequence
    assert sorted(item.CodeValue for item in items) == ["113100", "113107", "113108", "113109"]
    assert all([e.keyword for e in item] == ["CodeValue"] for item in items)


def test_universal_return_keys_are_filled(archive, studies, tmp_path):
    keys = [f"StudyInstanceUID={studies.uid('B1')}", "PatientName", "StudyDate",
            "ClinicalTrialSiteID", "ClinicalTrialSubjectID", "PatientSex", "StudyDescription"]
    [response] = findscu(archive, tmp_path, "-S", "STUDY", keys).responses
    assert str(response.PatientName) == studies.pid("B1")
    assert response.StudyDate == studies.date("B1")
    assert response.ClinicalTrialSiteID == SITE_B
    assert response.ClinicalTrialSubjectID == studies.pid("B1")
    assert response.PatientSex == "F"
    assert not response.StudyDescription  # removed by de-identification: returned empty


def test_study_root_refuses_the_patient_level(archive, tmp_path):
    find = findscu(archive, tmp_path, "-S", "PATIENT", ["PatientID"])
    assert find.responses == []
    assert find.final.startswith(("Error", "Failed")), find.final
    assert findscu(archive, tmp_path, "-P", "PATIENT", ["PatientID"]).final == "Success"


def test_malformed_keys_fail_the_query(archive, tmp_path):
    for key in ("StudyDate=2021", "StudyInstanceUID=1.2.*", "SeriesNumber=two"):
        level = "SERIES" if key.startswith("Series") else "STUDY"
        find = findscu(archive, tmp_path, "-S", level, [key])
        assert find.responses == [] and find.final.startswith(("Error", "Failed")), key


# --- pynetdicom as the SCU ------------------------------------------------------------------


def _no_delay(event: evt.Event) -> None:
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@contextlib.contextmanager
def associated(archive: Archive, model: str) -> Iterator[Association]:
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", archive.dimse_port, ae_title="RICORD",
                         evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay)])
    assert assoc.is_established
    try:
        yield assoc
    finally:
        assoc.release()


def _find(archive: Archive, identifier: Dataset, model: str) -> tuple[list[int], list[Dataset]]:
    """One C-FIND: the statuses and the pending identifiers."""
    with associated(archive, model) as assoc:
        responses = list(assoc.send_c_find(identifier, model))
    return [s.Status for s, _ in responses], [ds for _, ds in responses if ds is not None]


def test_latin1_identifier_with_a_wildcard(archive, studies):
    """An identifier in ISO_IR 100 (Latin-1) with non-ASCII wildcard values does not fail.
    (pynetdicom as the SCU: findscu -v would print the Latin-1 request bytes to the log.)"""
    identifier = Dataset()
    identifier.SpecificCharacterSet = "ISO_IR 100"
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientName = "Müller^Zoë*"
    identifier.PatientID = ""
    identifier.StudyInstanceUID = ""
    assert "Müller".encode("latin-1") in encode(identifier, False, True)
    assert _find(archive, identifier, STUDY_ROOT) == ([0x0000], [])
    identifier.PatientName = f"{SITE_B}-*"
    statuses, found = _find(archive, identifier, STUDY_ROOT)
    assert statuses == [0xFF00, 0x0000]
    assert [str(ds.PatientID) for ds in found] == [studies.pid("B1")]


# --- C-CANCEL --------------------------------------------------------------------------------


def _bulk_identifier(studies: Studies, return_key: str) -> Dataset:
    """An IMAGE-level identifier matching every instance of the large series."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.StudyInstanceUID = studies.uid("D1")
    setattr(identifier, return_key, "")
    return identifier


def _find_cancelled_at_once(archive, studies) -> tuple[list[int], int]:
    """One C-FIND over the large series with its C-CANCEL sent right behind the request
    (pynetdicom sends the request before it returns the response iterator): (every status
    received, how many were pending)."""
    statuses, pending = [], 0
    with associated(archive, PATIENT_ROOT) as assoc:
        responses = assoc.send_c_find(_bulk_identifier(studies, "SOPInstanceUID"), PATIENT_ROOT,
                                      msg_id=7)
        assoc.send_c_cancel(7, query_model=PATIENT_ROOT)
        for status, found in responses:
            statuses.append(status.Status)
            if status.Status == 0xFF00:
                pending += 1
                assert found.StudyInstanceUID == studies.uid("D1")
    return statuses, pending


def test_c_cancel_stops_the_responses(archive, studies):
    """The C-CANCEL is on the wire before the search has run, so the archive reads it before
    it could send every match (cancelling on the first pending response raced the sender: with
    250 matches encoded fast, all could be out before the C-CANCEL arrived)."""
    matches = sum(n for _, _, n in BULK.series)
    statuses, pending = _find_cancelled_at_once(archive, studies)
    assert statuses[-1] == 0xFE00
    assert set(statuses[:-1]) <= {0xFF00}
    assert pending < matches


def test_without_cancel_every_match_comes_back(archive, studies):
    statuses, found = _find(archive, _bulk_identifier(studies, "InstanceNumber"), STUDY_ROOT)
    matches = sum(n for _, _, n in BULK.series)
    assert statuses == [0xFF00] * matches + [0x0000]
    assert sorted(int(ds.InstanceNumber) for ds in found) == list(range(1, matches + 1))
