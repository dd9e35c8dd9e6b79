"""QIDO-RS conformance: the six search resources of PS3.18 against one running archive.

One archive per module, loaded with a known corpus (three patients at two sites, four studies,
CT and MR series). The de-identified values (pseudonyms, shifted dates, new UIDs) are learned
from the universal queries; every other query is checked against those documents filtered in
plain Python, and a differential test filters the objects retrieved over WADO-RS with pydicom.
"""

from __future__ import annotations

import datetime as dt
import http.client
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode
from xml.etree import ElementTree as ET

import orjson
import pydicom
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, MRImageStorage

from ricord_archive.dicom.xml import to_xml
from ricord_archive.search.model import KEYS, Level, attribute_path
from tests import dcmtk
from tests.conftest import Archive, _stop_leftover_postgres
from tests.phi_corpus import PhiCorpus

SITES_CONFIG = """
[[sites]]
name = "site-a"
aets = ["PACS_A"]
siteid = "482913"
default = true

[[sites]]
name = "site-b"
aets = ["PACS_B"]
siteid = "654321"
"""
SITE_A, SITE_B = "482913", "654321"  # pinned: prefixes in the tests stay unambiguous

# Tags of the attributes the tests read.
PATIENT_ID, PATIENT_NAME, PATIENT_SEX = "00100020", "00100010", "00100040"
SITE_ID, SUBJECT_ID = "00120030", "00120040"
STUDY_UID, SERIES_UID, SOP_UID, SOP_CLASS = "0020000D", "0020000E", "00080018", "00080016"
STUDY_DATE, STUDY_TIME, ACCESSION, STUDY_ID = "00080020", "00080030", "00080050", "00200010"
MODALITY, SERIES_NUMBER, INSTANCE_NUMBER = "00080060", "00200011", "00200013"
PPS_DATE, PPS_TIME = "00400244", "00400245"
MODALITIES, RETRIEVE_URL, SLICE_THICKNESS = "00080061", "00081190", "00180050"
NUM_STUDY_SERIES, NUM_STUDY_INSTANCES, NUM_SERIES_INSTANCES = "00201206", "00201208", "00201209"
STUDY_KEYS = (PATIENT_ID, PATIENT_NAME, STUDY_UID, STUDY_DATE, STUDY_TIME, ACCESSION, STUDY_ID)
SERIES_KEYS = (SERIES_UID, MODALITY, SERIES_NUMBER)

LEVELS = ("studies", "series", "instances")
# An instance search must name its studies (else 400): this term names every study of the corpus
# (each holds CT or MR), added to an instance search that names none.
EVERY_STUDY = ("ModalitiesInStudy", "CT,MR")
UNIQUE = {"studies": STUDY_UID, "series": SERIES_UID, "instances": SOP_UID}


# --- the corpus ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedStudy:
    """One study as sent. Times of day survive de-identification: StudyTime names the study."""

    label: str
    patient: str
    date: dt.date
    time: str
    series: tuple[tuple[str, int, int], ...]  # (modality, series number, slices)
    sender: str  # "stow", or the calling AE title of a C-STORE


PLAN = (
    PlannedStudy("A1", "A", dt.date(2021, 3, 4), "101500", (("CT", 1, 3), ("MR", 2, 2)), "stow"),
    PlannedStudy("A2", "A", dt.date(2021, 3, 10), "083000", (("CT", 5, 2),), "stow"),
    PlannedStudy("B1", "B", dt.date(2022, 1, 15), "140000", (("CT", 3, 2),), "PACS_B"),
    PlannedStudy("C1", "C", dt.date(2020, 7, 1), "164500", (("MR", 7, 1),), "PACS_A"),
)
SEX = {"C": "M"}  # the others "F"
# Patient C's model name holds a control character XML cannot hold; the others "SCANNER 9000".
MODEL_NAME = {"C": "BELL\x07 SCANNER"}
SLICE_THICKNESS_MM = 1.25


def pps_time(series_number: int) -> str:
    """PerformedProcedureStepStartTime of a series: distinct per series number."""
    return f"{9 + series_number:02d}0000"


def _edit(path: Path, planned: PlannedStudy, modality: str, number: int) -> None:
    ds = pydicom.dcmread(path)
    ds.StudyTime = planned.time
    ds.SeriesNumber = number
    ds.PatientSex = SEX.get(planned.patient, "F")
    ds.SliceThickness = SLICE_THICKNESS_MM
    ds.PerformedProcedureStepStartDate = planned.date.strftime("%Y%m%d")
    ds.PerformedProcedureStepStartTime = pps_time(number)
    if modality == "MR":
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.ManufacturerModelName = MODEL_NAME.get(planned.patient, "SCANNER 9000")
    ds.save_as(path)


def write_study(corpus: PhiCorpus, patient, planned: PlannedStudy) -> list[Path]:
    """The files of one planned study: one call of the corpus per series, all in one study."""
    files: list[Path] = []
    study_uid = None
    for modality, number, slices in planned.series:
        written = corpus.study(patient, planned.date, slices, study_uid, modality)
        study_uid = pydicom.dcmread(written[0]).StudyInstanceUID
        for path in written:
            _edit(path, planned, modality, number)
        files += written
    return files


def send(archive: Archive, files: list[Path], sender: str) -> None:
    if sender == "stow":
        stored = archive.client().store_instances([pydicom.dcmread(f) for f in files])
        assert len(stored.ReferencedSOPSequence) == len(files)
        assert "FailedSOPSequence" not in stored
    else:
        sent = dcmtk.storescu(archive.dimse_port, files, calling=sender)
        assert sent.returncode == 0, sent.stderr
        assert sent.stderr.count("(Success)") == len(files), sent.stderr


def load_corpus(archive: Archive, out_dir: Path, plan=PLAN) -> None:
    corpus = PhiCorpus(seed=4044, out_dir=out_dir)
    patients = {label: corpus.patient() for label in dict.fromkeys(p.patient for p in plan)}
    for planned in plan:
        send(archive, write_study(corpus, patients[planned.patient], planned), planned.sender)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Iterator[Archive]:
    """One archive for the whole module, loaded with the corpus."""
    base = tmp_path_factory.mktemp("qido")
    config = base / "ricord-archive.toml"
    config.write_text(SITES_CONFIG)
    running = Archive(base / "data", base / "archive.log", config)
    try:
        running.start()
        load_corpus(running, base / "corpus")
        yield running
    finally:
        running.stop()
        _stop_leftover_postgres(running.data_dir)


# --- reading DICOM JSON ----------------------------------------------------------------------


def first(document: dict, tag: str):
    values = document.get(tag, {}).get("Value")
    return values[0] if values else None


def text(document: dict, tag: str) -> str | None:
    value = first(document, tag)
    return value["Alphabetic"] if isinstance(value, dict) else value


def date_of(document: dict, tag: str = STUDY_DATE) -> dt.date:
    return dt.datetime.strptime(first(document, tag), "%Y%m%d").date()


def time_of(document: dict, tag: str = STUDY_TIME) -> dt.time:
    return dt.datetime.strptime(first(document, tag)[:6], "%H%M%S").time()


def unique_ids(documents: list[dict], level: str) -> list[str]:
    return [first(d, UNIQUE[level]) for d in documents]


@dataclass
class Known:
    """What the archive holds, as its universal queries answer it."""

    url: str
    studies: list[dict]
    series: list[dict]
    instances: list[dict]

    def level(self, name: str) -> list[dict]:
        return {"studies": self.studies, "series": self.series, "instances": self.instances}[name]

    def study(self, label: str) -> dict:
        time = next(p.time for p in PLAN if p.label == label)
        [study] = [s for s in self.studies if first(s, STUDY_TIME) == time]
        return study

    def uid(self, label: str) -> str:
        return first(self.study(label), STUDY_UID)

    def date(self, label: str) -> dt.date:
        return date_of(self.study(label))

    def pid(self, patient: str) -> str:
        label = next(p.label for p in PLAN if p.patient == patient)
        return first(self.study(label), PATIENT_ID)

    def modalities(self, document: dict) -> list[str]:
        [study] = [s for s in self.studies if first(s, STUDY_UID) == first(document, STUDY_UID)]
        return study[MODALITIES]["Value"]

    def series_uid(self, label: str, modality: str) -> str:
        return next(
            first(s, SERIES_UID) for s in self.series
            if first(s, STUDY_UID) == self.uid(label) and first(s, MODALITY) == modality
        )


@pytest.fixture(scope="module")
def known(archive) -> Known:
    client = archive.client()
    return Known(
        archive.dicomweb_url,
        client.search_for_studies(),
        client.search_for_series(),
        client.search_for_instances(search_filters=dict([EVERY_STUDY])),
    )


def _names_studies(name: str, value: str) -> bool:
    path = attribute_path(name)
    key = KEYS.get(path[0]) if path else None
    return key is not None and value.strip() not in ("", "*") and (
        key.level <= Level.STUDY or key.path in ("SeriesInstanceUID", "SOPInstanceUID"))


def narrowed(path: str, params=None):
    """The parameters of a search, with EVERY_STUDY added to an instance search over the whole
    archive that names no studies."""
    pairs = list(params.items() if isinstance(params, dict) else params or [])
    if path != "instances" or any(_names_studies(k, str(v)) for k, v in pairs):
        return params
    return [*pairs, EVERY_STUDY]


def get(archive: Archive, path: str, params=None, **headers: str) -> requests.Response:
    return requests.get(f"{archive.dicomweb_url}/{path}", params=narrowed(path, params),
                        headers=headers, timeout=30)


def raw_get(archive: Archive, path_and_query: str) -> tuple[int, bytes]:
    """A GET whose query string travels exactly as written (requests would re-quote `^`)."""
    connection = http.client.HTTPConnection("127.0.0.1", archive.http_port, timeout=30)
    try:
        connection.request("GET", f"/dicom-web/{path_and_query}")
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def search(archive: Archive, level: str, params: dict | None = None, **options) -> list[dict]:
    client = archive.client()
    method = {
        "studies": client.search_for_studies,
        "series": client.search_for_series,
        "instances": client.search_for_instances,
    }[level]
    filters = narrowed(level, params)
    return method(search_filters=dict(filters) if filters else filters, **options)


# --- the corpus as stored --------------------------------------------------------------------


def test_universal_queries_return_the_whole_corpus(known):
    assert len(known.studies) == len(PLAN)
    assert len(known.series) == sum(len(p.series) for p in PLAN)
    assert len(known.instances) == sum(n for p in PLAN for _, _, n in p.series)
    assert sorted(first(s, STUDY_TIME) for s in known.studies) == sorted(p.time for p in PLAN)
    assert all({"CT", "MR"} & set(known.modalities(s)) for s in known.studies)  # EVERY_STUDY
    assert {first(s, SITE_ID) for s in known.studies} == {SITE_A, SITE_B}
    assert len({known.pid("A"), known.pid("B"), known.pid("C")}) == 3
    assert known.date("A2") - known.date("A1") == dt.timedelta(days=6)  # one offset a patient


def test_the_six_resources(archive, known):
    client = archive.client()
    a1 = known.uid("A1")
    mr = known.series_uid("A1", "MR")
    assert unique_ids(client.search_for_series(a1), "series") == [
        first(s, SERIES_UID) for s in known.series if first(s, STUDY_UID) == a1
    ]
    assert unique_ids(client.search_for_instances(a1), "instances") == [
        first(i, SOP_UID) for i in known.instances if first(i, STUDY_UID) == a1
    ]
    in_series = client.search_for_instances(a1, mr)
    assert unique_ids(in_series, "instances") == [
        first(i, SOP_UID) for i in known.instances if first(i, SERIES_UID) == mr
    ]
    assert len(in_series) == 2
    assert client.search_for_instances(known.uid("B1"), mr) == []  # the series is not in B1


@pytest.mark.parametrize("level", LEVELS)
def test_universal_matching_by_empty_value_and_star(archive, known, level):
    everything = unique_ids(known.level(level), level)
    for value in ("", "*"):
        for key in ("PatientID", "PatientName", "StudyDate", "StudyInstanceUID"):
            assert unique_ids(search(archive, level, {key: value}), level) == everything


# --- every matching type, at every level, by keyword and by tag ------------------------------

Predicate = Callable[[dict], bool]
CaseBuilder = Callable[[Known], tuple[dict[str, str], Predicate]]


def equals(tag: str, value) -> Predicate:
    return lambda document: text(document, tag) == value


def date_between(low: dt.date | None, high: dt.date | None, tag: str = STUDY_DATE) -> Predicate:
    def predicate(document: dict) -> bool:
        day = date_of(document, tag)
        return (low is None or day >= low) and (high is None or day <= high)

    return predicate


def time_between(low: str, high: str) -> Predicate:
    return lambda document: low <= first(document, STUDY_TIME)[:6] <= high


def date_time_between(low: dt.datetime, high: dt.datetime) -> Predicate:
    return lambda document: low <= dt.datetime.combine(date_of(document), time_of(document)) <= high


def yyyymmdd(day: dt.date) -> str:
    return day.strftime("%Y%m%d")


# Each case: (the lowest level it applies at, what to expect, builder of params and predicate).
# "some" demands a proper subset of the corpus at every level, so no case passes vacuously.
CASES: dict[str, tuple[str, str, CaseBuilder]] = {
    "PatientID single value": ("studies", "some", lambda k: (
        {"PatientID": k.pid("A")}, equals(PATIENT_ID, k.pid("A")))),
    "PatientName single value": ("studies", "some", lambda k: (
        {"PatientName": k.pid("B")}, equals(PATIENT_NAME, k.pid("B")))),
    "PatientName wildcard *": ("studies", "some", lambda k: (
        {"PatientName": f"{SITE_B}-*"}, lambda d: text(d, PATIENT_NAME).startswith(SITE_B))),
    "PatientID wildcard ?": ("studies", "some", lambda k: (
        {"PatientID": k.pid("B")[:-2] + "??"}, equals(PATIENT_ID, k.pid("B")))),
    "PatientName wildcard * in the middle": ("studies", "some", lambda k: (
        {"PatientName": f"{k.pid('C')[:3]}*{k.pid('C')[-2:]}"}, equals(PATIENT_ID, k.pid("C")))),
    "PatientID % is literal": ("studies", "none", lambda k: ({"PatientID": "%"}, None)),
    "PatientName % before * is literal": ("studies", "none", lambda k: (
        {"PatientName": "%*"}, None)),
    "PatientID _ is literal": ("studies", "none", lambda k: (
        {"PatientID": k.pid("A")[:-1] + "_"}, None)),
    "AccessionNumber _ with * is literal": ("studies", "none", lambda k: (
        {"AccessionNumber": "_*"}, None)),
    "AccessionNumber single value": ("studies", "some", lambda k: (
        {"AccessionNumber": text(k.study("A2"), ACCESSION)}, equals(STUDY_UID, k.uid("A2")))),
    "StudyID wildcard": ("studies", "some", lambda k: (
        {"StudyID": text(k.study("B1"), STUDY_ID)[:5] + "*"},
        lambda d: text(d, STUDY_ID).startswith(text(k.study("B1"), STUDY_ID)[:5]))),
    "PatientSex single value": ("studies", "some", lambda k: (
        {"PatientSex": "M"}, equals(PATIENT_SEX, "M"))),
    "ClinicalTrialSiteID": ("studies", "some", lambda k: (
        {"ClinicalTrialSiteID": SITE_B}, equals(SITE_ID, SITE_B))),
    "ClinicalTrialSubjectID": ("studies", "some", lambda k: (
        {"ClinicalTrialSubjectID": k.pid("C")}, equals(SUBJECT_ID, k.pid("C")))),
    "StudyInstanceUID single": ("studies", "some", lambda k: (
        {"StudyInstanceUID": k.uid("A2")}, equals(STUDY_UID, k.uid("A2")))),
    "StudyInstanceUID list with commas": ("studies", "some", lambda k: (
        {"StudyInstanceUID": f"{k.uid('A1')},{k.uid('C1')}"},
        lambda d: text(d, STUDY_UID) in (k.uid("A1"), k.uid("C1")))),
    "StudyInstanceUID list with backslashes": ("studies", "some", lambda k: (
        {"StudyInstanceUID": f"{k.uid('B1')}\\{k.uid('C1')}"},
        lambda d: text(d, STUDY_UID) in (k.uid("B1"), k.uid("C1")))),
    "StudyInstanceUID of nothing": ("studies", "none", lambda k: (
        {"StudyInstanceUID": "1.2.3.4"}, None)),
    "StudyDate single": ("studies", "some", lambda k: (
        {"StudyDate": yyyymmdd(k.date("A1"))}, date_between(k.date("A1"), k.date("A1")))),
    "StudyDate closed range": ("studies", "some", lambda k: (
        {"StudyDate": f"{yyyymmdd(k.date('A1'))}-{yyyymmdd(k.date('A2'))}"},
        date_between(k.date("A1"), k.date("A2")))),
    "StudyDate open start": ("studies", "some", lambda k: (
        {"StudyDate": f"-{yyyymmdd(k.date('A1'))}"}, date_between(None, k.date("A1")))),
    "StudyDate open end": ("studies", "some", lambda k: (
        {"StudyDate": f"{yyyymmdd(k.date('A2'))}-"}, date_between(k.date("A2"), None))),
    "StudyDate range of nothing": ("studies", "none", lambda k: (
        {"StudyDate": "18000101-18001231"}, None)),
    "StudyTime single": ("studies", "some", lambda k: (
        {"StudyTime": "1015"}, time_between("101500", "101559"))),
    "StudyTime closed range": ("studies", "some", lambda k: (
        {"StudyTime": "0800-1030"}, time_between("080000", "103000"))),
    "StudyTime open end with colons": ("studies", "some", lambda k: (
        {"StudyTime": "12:00-"}, time_between("120000", "235959"))),
    "StudyDate and StudyTime: from D1 at T1 to D2 at T2": ("studies", "some", lambda k: (
        {"StudyDate": f"{yyyymmdd(k.date('A1'))}-{yyyymmdd(k.date('A2'))}",
         "StudyTime": "1100-0900"},
        date_time_between(dt.datetime.combine(k.date("A1"), dt.time(11)),
                          dt.datetime.combine(k.date("A2"), dt.time(9, 0, 59))))),
    "StudyDate and StudyTime: inverted times still span the days": ("studies", "some", lambda k: (
        {"StudyDate": f"{yyyymmdd(k.date('A1'))}-{yyyymmdd(k.date('A2'))}",
         "StudyTime": "1000-0900"},
        date_time_between(dt.datetime.combine(k.date("A1"), dt.time(10)),
                          dt.datetime.combine(k.date("A2"), dt.time(9, 0, 59))))),
    "ModalitiesInStudy": ("studies", "some", lambda k: (
        {"ModalitiesInStudy": "MR"}, lambda d: "MR" in k.modalities(d))),
    "ModalitiesInStudy list": ("studies", "all", lambda k: (
        {"ModalitiesInStudy": "MR\\CT"}, None)),
    "ModalitiesInStudy of nothing": ("studies", "none", lambda k: (
        {"ModalitiesInStudy": "US"}, None)),
    "Modality single": ("series", "some", lambda k: ({"Modality": "MR"}, equals(MODALITY, "MR"))),
    "Modality wildcard ?": ("series", "some", lambda k: (
        {"Modality": "?T"}, equals(MODALITY, "CT"))),
    "Modality _ is literal": ("series", "none", lambda k: ({"Modality": "_T"}, None)),
    "SeriesNumber single": ("series", "some", lambda k: (
        {"SeriesNumber": "5"}, equals(SERIES_NUMBER, 5))),
    "SeriesNumber list": ("series", "some", lambda k: (
        {"SeriesNumber": "2,7"}, lambda d: first(d, SERIES_NUMBER) in (2, 7))),
    "SeriesInstanceUID": ("series", "some", lambda k: (
        {"SeriesInstanceUID": k.series_uid("A1", "MR")},
        equals(SERIES_UID, k.series_uid("A1", "MR")))),
    "PerformedProcedureStepStartDate range": ("series", "some", lambda k: (
        {"PerformedProcedureStepStartDate": f"-{yyyymmdd(k.date('A1'))}"},
        date_between(None, k.date("A1"), PPS_DATE))),
    "PerformedProcedureStepStartTime range": ("series", "some", lambda k: (
        {"PerformedProcedureStepStartTime": f"{pps_time(2)}-{pps_time(3)}"},
        lambda d: pps_time(2) <= first(d, PPS_TIME) <= pps_time(3))),
    "SOPClassUID": ("instances", "some", lambda k: (
        {"SOPClassUID": MRImageStorage}, equals(SOP_CLASS, MRImageStorage))),
    "InstanceNumber": ("instances", "some", lambda k: (
        {"InstanceNumber": "2"}, equals(INSTANCE_NUMBER, 2))),
    "SOPInstanceUID list": ("instances", "some", lambda k: (
        {"SOPInstanceUID": ",".join(first(i, SOP_UID) for i in k.instances[3:5])},
        lambda d: d in k.instances[3:5])),
    "removed attribute with a value matches nothing": ("studies", "none", lambda k: (
        {"StudyDescription": "CHEST*"}, None)),
    "removed attribute, universal, matches everything": ("studies", "all", lambda k: (
        {"ReferringPhysicianName": "*"}, None)),
}


def _as_tags(params: dict[str, str]) -> dict[str, str]:
    return {f"{tag_for_keyword(key):08X}": value for key, value in params.items()}


# A case applies at its level and below (series and instances carry their study's attributes);
# keys of a lower level are ignored: see test_keys_of_a_lower_level_are_ignored_and_reported.
CASE_LEVELS = [
    (name, level) for name, (case_level, _, _) in CASES.items() for level in LEVELS
    if LEVELS.index(level) >= LEVELS.index(case_level)
]


@pytest.mark.parametrize("key_form", ["keyword", "tag"])
@pytest.mark.parametrize(("name", "level"), CASE_LEVELS)
def test_matching(archive, known, name, level, key_form):
    _, expect, build = CASES[name]
    params, predicate = build(known)
    everything = known.level(level)
    if expect == "none":
        expected = []
    elif expect == "all":
        expected = everything
    else:
        expected = [d for d in everything if predicate(d)]
        assert 0 < len(expected) < len(everything), f"corpus does not exercise {name}"
    query = params if key_form == "keyword" else _as_tags(params)
    assert unique_ids(search(archive, level, query), level) == unique_ids(expected, level)


def test_combined_date_time_is_not_two_separate_ranges(archive, known):
    """Separately, StudyTime=1000-0900 is an empty range; combined it spans the days."""
    days = f"{yyyymmdd(known.date('A1'))}-{yyyymmdd(known.date('A2'))}"
    combined = search(archive, "studies", {"StudyDate": days, "StudyTime": "1000-0900"})
    assert {known.uid("A1"), known.uid("A2")} <= set(unique_ids(combined, "studies"))
    assert search(archive, "studies", {"StudyTime": "1000-0900"}) == []
    late = search(archive, "studies", {"StudyDate": days, "StudyTime": "1100-0900"})
    assert known.uid("A1") not in unique_ids(late, "studies")  # D1 at 10:15 is before 11:00
    assert known.uid("A2") in unique_ids(late, "studies")  # D2 at 08:30 is before 09:00


def test_fuzzy_matching_matches_any_name_component_by_prefix(archive, known):
    number = known.pid("C").split("-")[1]
    assert search(archive, "studies", {"PatientName": number}) == []
    fuzzy = search(archive, "studies", {"PatientName": number}, fuzzymatching=True)
    assert unique_ids(fuzzy, "studies") == [
        first(s, STUDY_UID) for s in known.studies if text(s, PATIENT_NAME).endswith(number)
    ]
    prefix = search(archive, "studies", {"PatientName": SITE_B[:3]}, fuzzymatching=True)
    assert unique_ids(prefix, "studies") == [known.uid("B1")]
    with_wildcard = search(archive, "studies", {"PatientName": SITE_B[:2] + "?" + SITE_B[3:]},
                           fuzzymatching=True)
    assert unique_ids(with_wildcard, "studies") == [known.uid("B1")]
    exact = search(archive, "studies", {"PatientName": known.pid("A")}, fuzzymatching=False)
    assert exact == search(archive, "studies", {"PatientName": known.pid("A")})


def test_fuzzy_matching_is_at_least_as_broad_as_exact_matching(archive, known):
    for value in (known.pid("A"), f"{SITE_B}-*", "*1", known.pid("C")[:-1] + "?"):
        exact = unique_ids(search(archive, "studies", {"PatientName": value}), "studies")
        fuzzy = search(archive, "studies", {"PatientName": value}, fuzzymatching=True)
        assert exact and set(exact) <= set(unique_ids(fuzzy, "studies")), value


def test_keys_of_a_lower_level_are_ignored_and_reported(archive, known):
    response = get(archive, "studies", {"Modality": "MR", "SOPClassUID": CTImageStorage})
    assert response.status_code == 200
    assert unique_ids(response.json(), "studies") == unique_ids(known.studies, "studies")
    warning = response.headers["Warning"]
    assert warning.startswith("299 ")
    assert "Modality" in warning and "SOPClassUID" in warning


def test_unknown_keys_are_ignored_with_a_warning_naming_them(archive, known):
    response = get(archive, "series", {"BodyPartExamined": "CHEST", "00091001": "x",
                                       "Modality": "MR"})
    assert response.status_code == 200
    assert unique_ids(response.json(), "series") == [
        first(s, SERIES_UID) for s in known.series if first(s, MODALITY) == "MR"
    ]
    assert "BodyPartExamined" in response.headers["Warning"]
    assert "00091001" in response.headers["Warning"]
    assert "Warning" not in get(archive, "series", {"Modality": "MR"}).headers


def warnings_of(response: requests.Response) -> list[tuple[str, str]]:
    """(warn-agent, text) of each 299 warning, the quoted-string unescaped (RFC 9110)."""
    found = re.findall(r'299 ([^ ]+) "((?:[^"\\]|\\.)*)"', response.headers["Warning"])
    return [(agent, re.sub(r"\\(.)", r"\1", text)) for agent, text in found]


def test_parameters_that_are_not_attributes_are_ignored_with_a_warning(archive, known):
    """PS3.18: a query parameter the archive does not support is ignored, not refused; the
    Warning (code 299, the host the client reached as warn-agent) names it."""
    params = {"NotAKeyword": "x", "accept": "application/dicom+json", "Modality": "MR"}
    response = get(archive, "series", params)
    assert response.status_code == 200
    assert unique_ids(response.json(), "series") == [
        first(s, SERIES_UID) for s in known.series if first(s, MODALITY) == "MR"
    ]
    assert warnings_of(response) == [
        (f"127.0.0.1:{archive.http_port}",
         "ignored: 'NotAKeyword' is not a query parameter of this archive"),
        (f"127.0.0.1:{archive.http_port}",
         "ignored: 'accept' is not a query parameter of this archive"),
    ]


def test_odd_parameter_names_are_named_safely_in_the_warning(archive, known):
    response = requests.get(f"{archive.dicomweb_url}/studies?a%0D%0Ab=1&%22q%22=2&%C3%BC=3",
                            timeout=30)
    assert response.status_code == 200
    assert all(32 <= ord(c) < 127 for c in response.headers["Warning"])
    assert [text for _, text in warnings_of(response)] == [
        "ignored: 'a\\r\\nb' is not a query parameter of this archive",
        "ignored: '\"q\"' is not a query parameter of this archive",
        "ignored: '\\xfc' is not a query parameter of this archive",
    ]


# --- encodings of keys and values ------------------------------------------------------------


def raw_studies(archive: Archive, query: str) -> list[str]:
    """The Study Instance UIDs a raw query string finds (it must be answered 200)."""
    status, body = raw_get(archive, f"studies?{query}")
    assert status == 200, (query, body)
    return unique_ids(orjson.loads(body), "studies")


def test_percent_encoded_and_raw_values_are_the_same_query(archive, known):
    pid = known.pid("B")  # the only patient of its site: a prefix of its pseudonym is its own
    for query in (
        f"PatientName={pid[:4]}*", f"PatientName={pid[:4]}%2A", f"00100010={pid[:4]}%2a",
        f"PatientName={pid}^", f"PatientName={pid}%5E", f"PatientName={pid}%5E%5E",
        f"PatientID={quote(pid)}", f"PatientName={pid[:-1]}%3F", f"%50atientID={pid}",
    ):
        assert raw_studies(archive, query) == [known.uid("B1")], query
    for query in (f"PatientName={pid}%5EJOHN", f"PatientName={pid}^JOHN", "PatientID=%2A%25"):
        assert raw_studies(archive, query) == [], query


def test_a_plus_is_a_space_and_surrounding_spaces_are_insignificant(archive, known):
    pid = known.pid("B")
    for query in (f"PatientID={pid}+", f"PatientID=%20{pid}%20%20", f"PatientName=+{pid}*"):
        assert raw_studies(archive, query) == [known.uid("B1")], query
    assert raw_studies(archive, f"PatientID={pid}%2B") == []
    assert raw_studies(archive, f"PatientID={pid[:3]}+{pid[3:]}") == []
    assert raw_studies(archive, "PatientID=+") == unique_ids(known.studies, "studies")


def test_keys_naming_the_resource_path_narrow_it_further(archive, known):
    a1, b1 = known.uid("A1"), known.uid("B1")
    client = archive.client()
    assert client.search_for_series(a1, search_filters={"StudyInstanceUID": b1}) == []
    both = client.search_for_series(a1, search_filters={"StudyInstanceUID": f"{a1},{b1}"})
    assert unique_ids(both, "series") == [
        first(s, SERIES_UID) for s in known.series if first(s, STUDY_UID) == a1
    ]
    mr = known.series_uid("A1", "MR")
    assert client.search_for_instances(a1, mr, search_filters={"SeriesInstanceUID": "1.2"}) == []


# --- includefield ----------------------------------------------------------------------------


def test_instances_carry_a_default_subset_and_includefield_adds_attributes(archive, known):
    [default] = search(archive, "instances", {"SOPInstanceUID": first(known.instances[0], SOP_UID)})
    assert SLICE_THICKNESS not in default and "00080070" not in default
    for fields, with_manufacturer in (
        (["00180050"], False), (["SliceThickness"], False),
        (["SliceThickness", "Manufacturer"], True), (["00180050,00080070"], True),
        (["SliceThickness, Manufacturer"], True),
    ):
        found = search(archive, "instances", fields=fields)
        assert len(found) == len(known.instances), fields
        assert all(first(i, SLICE_THICKNESS) == SLICE_THICKNESS_MM for i in found), fields
        manufacturers = {first(i, "00080070") for i in found}
        assert manufacturers == ({"ACME MEDICAL"} if with_manufacturer else {None}), fields


def test_includefield_all_returns_every_stored_attribute(archive):
    [some] = search(archive, "instances", {"InstanceNumber": "3"}, fields=["all"])
    assert first(some, SLICE_THICKNESS) == SLICE_THICKNESS_MM
    assert some["00200032"]["Value"] == [0, 0, 3]  # ImagePositionPatient
    assert first(some, "00080070") == "ACME MEDICAL"


def test_includefield_keeps_study_and_series_attributes_of_instances(archive, known):
    found = search(archive, "instances", fields=["SliceThickness"])
    for instance in found:
        assert all(tag in instance for tag in STUDY_KEYS + SERIES_KEYS)


def test_repeated_includefield_parameters_add_up(archive, known):
    response = get(archive, "instances", [("includefield", "SliceThickness"),
                                          ("includefield", "00080070"), ("limit", "1")])
    assert response.status_code == 200
    [instance] = response.json()
    assert first(instance, SLICE_THICKNESS) == SLICE_THICKNESS_MM
    assert first(instance, "00080070") == "ACME MEDICAL"


# --- what each level returns -----------------------------------------------------------------


def test_study_aggregates_equal_what_was_stored(known):
    for planned in PLAN:
        study = known.study(planned.label)
        assert first(study, NUM_STUDY_SERIES) == len(planned.series)
        assert first(study, NUM_STUDY_INSTANCES) == sum(n for _, _, n in planned.series)
        assert study[MODALITIES]["Value"] == sorted({m for m, _, _ in planned.series})


def test_series_aggregates_equal_what_was_stored(known):
    for planned in PLAN:
        for modality, number, slices in planned.series:
            [series] = [s for s in known.series if first(s, STUDY_UID) == known.uid(planned.label)
                        and first(s, SERIES_NUMBER) == number]
            assert first(series, MODALITY) == modality
            assert first(series, NUM_SERIES_INSTANCES) == slices
            assert first(series, PPS_TIME) == pps_time(number)


def _study_of(known: Known, document: dict) -> dict:
    [study] = [s for s in known.studies if first(s, STUDY_UID) == first(document, STUDY_UID)]
    return study


def test_series_results_carry_their_study_attributes(known):
    for series in known.series:
        study = _study_of(known, series)
        for tag in (*STUDY_KEYS, SITE_ID, SUBJECT_ID, PATIENT_SEX):
            assert series[tag] == study[tag], tag


def test_instance_results_carry_study_and_series_attributes(known):
    for instance in known.instances:
        study = _study_of(known, instance)
        [series] = [s for s in known.series if first(s, SERIES_UID) == first(instance, SERIES_UID)]
        for tag in STUDY_KEYS:
            assert instance[tag] == study[tag], tag
        for tag in SERIES_KEYS:
            assert instance[tag] == series[tag], tag
        assert first(instance, SOP_CLASS) == (
            MRImageStorage if first(series, MODALITY) == "MR" else CTImageStorage)


def test_retrieve_url_per_level(known):
    url = known.url
    for study in known.studies:
        assert first(study, RETRIEVE_URL) == f"{url}/studies/{first(study, STUDY_UID)}"
    for series in known.series:
        assert first(series, RETRIEVE_URL) == (
            f"{url}/studies/{first(series, STUDY_UID)}/series/{first(series, SERIES_UID)}")
    for instance in known.instances:
        assert first(instance, RETRIEVE_URL) == (
            f"{url}/studies/{first(instance, STUDY_UID)}/series/{first(instance, SERIES_UID)}"
            f"/instances/{first(instance, SOP_UID)}")


# --- paging ----------------------------------------------------------------------------------


def _more(response: requests.Response) -> int | None:
    match = re.search(r'"(\d+) more matches', response.headers.get("Warning", ""))
    return int(match.group(1)) if match else None


@pytest.mark.parametrize("level", LEVELS)
def test_pages_concatenate_to_the_unpaged_list(archive, known, level):
    everything = unique_ids(known.level(level), level)
    pages, offset = [], 0
    while True:
        response = get(archive, level, {"limit": "3", "offset": str(offset)})
        assert response.status_code == 200
        page = unique_ids(response.json(), level)
        if not page:
            break
        remaining = len(everything) - offset - len(page)
        assert _more(response) == (remaining or None), (offset, response.headers)
        pages += page
        offset += len(page)
    assert pages == everything
    paged = search(archive, level, limit=2, get_remaining=True)
    assert unique_ids(paged, level) == everything


def test_paging_a_filtered_query(archive, known):
    response = get(archive, "instances", {"Modality": "CT", "limit": "2", "offset": "1"})
    ct = [first(i, SOP_UID) for i in known.instances if first(i, MODALITY) == "CT"]
    assert unique_ids(response.json(), "instances") == ct[1:3]
    assert _more(response) == len(ct) - 3
    assert get(archive, "instances", {"offset": "1000"}).json() == []


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "params", "named"), [
    ("studies", {"StudyDate": "2021"}, "StudyDate"),
    ("studies", {"StudyDate": "20210230"}, "StudyDate"),
    ("studies", {"StudyDate": "2021-03-04"}, "StudyDate"),
    ("studies", {"StudyDate": "-"}, "StudyDate"),
    ("studies", {"StudyTime": "2500"}, "StudyTime"),
    ("studies", {"StudyDate": "20210101-20210102", "StudyTime": "99-"}, "StudyTime"),
    ("studies", {"StudyInstanceUID": "1.2.abc"}, "StudyInstanceUID"),
    ("studies", {"StudyInstanceUID": "1.2.*"}, "StudyInstanceUID"),
    ("studies", {"0020000D": "1.2.?"}, "StudyInstanceUID"),
    ("studies", {"StudyInstanceUID": "1." + "2" * 70}, "StudyInstanceUID"),
    ("series", {"SeriesNumber": "one"}, "SeriesNumber"),
    ("series", {"SeriesNumber": "1*"}, "SeriesNumber"),
    ("instances", {"InstanceNumber": "1.5"}, "InstanceNumber"),
    ("instances", {"SOPClassUID": "CT"}, "SOPClassUID"),
    ("studies", {"limit": "-1"}, "limit"),
    ("studies", {"limit": "ten"}, "limit"),
    ("studies", {"offset": "-3"}, "offset"),
    ("studies", {"includefield": "NotAKeyword"}, "includefield"),
    ("studies/not-a-uid/series", {}, "StudyInstanceUID"),
    ("studies", {"PatientName": "x" * 2000}, "PatientName"),
    ("studies", {"PatientName": "a\x00b"}, "PatientName"),
])
def test_malformed_queries_are_bad_requests_naming_the_problem(archive, path, params, named):
    response = get(archive, path, params)
    assert response.status_code == 400, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert named in response.json()["error"]


def test_an_image_accept_header_is_not_acceptable(archive):
    response = get(archive, "studies", Accept="image/png")
    assert response.status_code == 406
    assert "application/dicom+json" in response.json()["error"]
    assert get(archive, "series", Accept="application/dicom").status_code == 406


def test_json_is_the_default_and_what_json_accept_headers_get(archive, known):
    for accept in (None, "application/dicom+json", "application/json", "*/*",
                   "image/png, application/dicom+json;q=0.5"):
        headers = {"Accept": accept} if accept else {}
        response = get(archive, "studies", **headers)
        assert response.status_code == 200, accept
        assert response.headers["Content-Type"].startswith("application/dicom+json")
        assert unique_ids(response.json(), "studies") == unique_ids(known.studies, "studies")


def test_no_match_is_200_with_an_empty_array(archive):
    response = get(archive, "studies", {"PatientID": "000000-000000"})
    assert (response.status_code, response.text) == (200, "[]")
    assert archive.client().search_for_studies(search_filters={"PatientID": "x"}) == []
    assert archive.client().search_for_instances("1.2.3", "4.5.6") == []


# --- multipart XML ---------------------------------------------------------------------------


def _xml_parts(response: requests.Response) -> list[ET.Element]:
    content_type = response.headers["Content-Type"]
    assert content_type.startswith("multipart/related")
    assert 'type="application/dicom+xml"' in content_type
    boundary = re.search(r"boundary=\"?([^\";]+)", content_type).group(1).encode()
    chunks = response.content.split(b"--" + boundary)
    assert chunks[-1].strip() == b"--"
    parts = []
    for chunk in chunks[1:-1]:
        head, _, body = chunk.partition(b"\r\n\r\n")
        assert b"Content-Type: application/dicom+xml" in head
        parts.append(ET.fromstring(body.rstrip(b"\r\n")))
    return parts


def _xml_attributes(root: ET.Element) -> dict[str, list[str]]:
    attributes = {}
    for element in root.findall("DicomAttribute"):
        values = [v.text or "" for v in element.findall("Value")]
        values += [n.findtext("Alphabetic/FamilyName") for n in element.findall("PersonName")]
        attributes[element.get("tag")] = values
    return attributes


def _json_attributes(document: dict) -> dict[str, list[str]]:
    return {
        tag: [v["Alphabetic"] if isinstance(v, dict) else str(v) for v in body.get("Value", [])]
        for tag, body in document.items()
    }


@pytest.mark.parametrize("accept", [
    'multipart/related; type="application/dicom+xml"',
    "multipart/related; type=application/dicom+xml",
    "multipart/related;type=application/dicom+xml",
])
@pytest.mark.parametrize("level", LEVELS)
def test_multipart_xml_holds_the_json_attributes(archive, known, accept, level):
    response = get(archive, level, {"limit": "4"}, Accept=accept)
    assert response.status_code == 200
    parts = _xml_parts(response)
    documents = known.level(level)[:4]
    assert [root.tag for root in parts] == ["NativeDicomModel"] * len(documents)
    assert [_xml_attributes(root) for root in parts] == [
        _json_attributes(d) for d in documents
    ]
    assert _more(response) == ((len(known.level(level)) - 4) or None)


def test_multipart_xml_of_no_match_is_an_empty_multipart(archive):
    response = get(archive, "studies", {"PatientID": "nobody"},
                   Accept='multipart/related; type="application/dicom+xml"')
    assert response.status_code == 200
    assert _xml_parts(response) == []


def test_multipart_xml_of_a_stored_control_character_parses(archive, known):
    response = get(archive, "instances", {"includefield": "ManufacturerModelName"},
                   Accept="multipart/related; type=application/dicom+xml")
    assert response.status_code == 200
    models = [_xml_attributes(root)["00081090"] for root in _xml_parts(response)]
    assert len(models) == len(known.instances)
    assert ["BELL\ufffd SCANNER"] in models and ["SCANNER 9000"] in models
    json_models = {text(i, "00081090") for i in search(archive, "instances",
                                                       fields=["ManufacturerModelName"])}
    assert json_models == {"BELL\x07 SCANNER", "SCANNER 9000"}


def test_xml_of_values_with_characters_xml_cannot_hold_still_parses():
    document = {
        "00080070": {"vr": "LO", "Value": ["ACME\x07\x1b MEDICAL \ud800"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE\x01^JO<HN>&"}]},
        "00200013": {"vr": "IS", "Value": [3]},
    }
    root = ET.fromstring(to_xml(document))
    attributes = _xml_attributes(root)
    assert attributes["00080070"][0].startswith("ACME")
    assert attributes["00100010"] == ["DOE\ufffd"]
    assert root.findtext("DicomAttribute/PersonName/Alphabetic/GivenName") == "JO<HN>&"
    assert attributes["00200013"] == ["3"]


# --- CORS ------------------------------------------------------------------------------------


def test_cors_preflight_answers_204_with_the_allow_headers(archive):
    response = requests.options(
        f"{archive.dicomweb_url}/studies", timeout=30,
        headers={"Origin": "https://viewer.example.org", "Access-Control-Request-Method": "GET",
                 "Access-Control-Request-Headers": "accept"},
    )
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] in ("*", "https://viewer.example.org")
    assert "GET" in response.headers["Access-Control-Allow-Methods"]
    assert "accept" in response.headers["Access-Control-Allow-Headers"].lower()


def test_cors_get_allows_the_origin_and_exposes_warning(archive):
    response = get(archive, "studies", {"limit": "1"}, Origin="https://viewer.example.org")
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] in ("*", "https://viewer.example.org")
    assert "warning" in response.headers["Access-Control-Expose-Headers"].lower()
    assert response.headers["Warning"].startswith("299 ")
    refused = get(archive, "studies", {"StudyDate": "x"}, Origin="https://viewer.example.org")
    assert refused.status_code == 400
    assert "Access-Control-Allow-Origin" in refused.headers  # the browser may read the error


# --- differential: QIDO against the retrieved objects filtered with pydicom ------------------


def _wildcard(pattern: str) -> re.Pattern:
    return re.compile("".join(
        ".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern
    ), re.DOTALL)


@pytest.fixture(scope="module")
def retrieved(archive, known) -> list[Dataset]:
    """Every stored object, de-identified, as WADO-RS returns it."""
    client = archive.client()
    datasets = [ds for uid in unique_ids(known.studies, "studies")
                for ds in client.retrieve_study(uid)]
    assert len(datasets) == len(known.instances)
    return datasets


def _uids_where(datasets: list[Dataset], keyword: str, keep: Predicate) -> set[str]:
    return {str(ds[keyword].value) for ds in datasets if keep(ds)}


def test_differential_patient_name_wildcard(archive, known, retrieved):
    pattern = f"{SITE_B[:2]}*-0000?1"
    expected = _uids_where(retrieved, "StudyInstanceUID",
                           lambda ds: _wildcard(pattern).fullmatch(str(ds.PatientName)))
    found = search(archive, "studies", {"PatientName": pattern})
    assert expected and set(unique_ids(found, "studies")) == expected


def test_differential_study_date_range(archive, known, retrieved):
    low, high = sorted([yyyymmdd(known.date("A2")), yyyymmdd(known.date("B1"))])
    expected = _uids_where(retrieved, "StudyInstanceUID",
                           lambda ds: low <= ds.StudyDate <= high)
    found = search(archive, "studies", {"StudyDate": f"{low}-{high}"})
    assert expected and set(unique_ids(found, "studies")) == expected


def test_differential_modality_at_series_level(archive, retrieved):
    for modality in ("CT", "MR"):
        expected = _uids_where(retrieved, "SeriesInstanceUID",
                               lambda ds, m=modality: ds.Modality == m)
        found = search(archive, "series", {"Modality": modality})
        assert expected and set(unique_ids(found, "series")) == expected


def test_differential_instance_number_and_sop_class(archive, retrieved):
    expected = _uids_where(retrieved, "SOPInstanceUID", lambda ds: ds.InstanceNumber == 2)
    found = search(archive, "instances", {"InstanceNumber": "2"})
    assert expected and set(unique_ids(found, "instances")) == expected
    expected = _uids_where(retrieved, "SOPInstanceUID",
                           lambda ds: ds.SOPClassUID == MRImageStorage and ds.InstanceNumber == 1)
    found = search(archive, "instances", {"SOPClassUID": MRImageStorage, "InstanceNumber": "1"})
    assert expected and set(unique_ids(found, "instances")) == expected


def test_differential_attributes_of_an_instance(archive, retrieved):
    """What QIDO-RS says of an instance is what the stored object holds."""
    for ds in retrieved:
        [found] = search(archive, "instances", {"SOPInstanceUID": ds.SOPInstanceUID},
                         fields=["SliceThickness"])
        assert text(found, PATIENT_ID) == ds.PatientID
        assert first(found, STUDY_DATE) == ds.StudyDate
        assert first(found, SERIES_NUMBER) == ds.SeriesNumber
        assert first(found, INSTANCE_NUMBER) == ds.InstanceNumber
        assert first(found, SLICE_THICKNESS) == ds.SliceThickness


# --- fuzzing: no query makes the archive fail ------------------------------------------------

_KEYS = [
    "PatientName", "PatientID", "00100010", "0020000d", "StudyDate", "StudyTime",
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
    "ModalitiesInStudy", "SeriesNumber", "InstanceNumber", "AccessionNumber", "StudyID",
    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "ClinicalTrialSiteID", "ClinicalTrialSubjectID", "PatientSex", "PatientBirthDate",
    "ReferringPhysicianName", "RequestAttributesSequence.RequestedProcedureID",
    "00400275.00401001", "limit", "offset", "includefield", "fuzzymatching",
    "foo", "", "Patient Name", "00100010.", "FFFFFFFF", "7FE00010", "%", "ü", "0010001G",
]
_VALUES = [
    "*", "?", "%", "_", "\\", "'", '"', "\x00", "a\x00", "x" * 10_000, "-", "--", "2021-",
    "-2021", "20210101-20201231-", "20219999", "1.2.*", "1..2", ",", "\\\\", "ü*", "Ω^ü",
    "𝄞", "true", "all", "0", "-1", "99999999999", "1e3", "NaN", "' OR 1=1 --", "%25",
    "%%", "*%_*", "12:00-", "25:61", "20210101-", "\u202e", "\r\n", "\t", " ",
]
_PATHS = [
    "studies", "series", "instances", "studies/1.2.3/series", "studies/1.2.3/instances",
    "studies/1.2.3/series/4.5/instances", "studies/x*/series", "studies/%2A/instances",
]


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    path=st.sampled_from(_PATHS),
    pairs=st.lists(st.tuples(
        st.one_of(st.sampled_from(_KEYS), st.text(max_size=12)),
        st.one_of(st.sampled_from(_VALUES), st.text(max_size=40)),
    ), max_size=5),
    raw=st.one_of(st.none(), st.text(alphabet="%0123456789abcdefABCDEFGz&=+*^\\", max_size=30)),
)
def test_no_query_is_answered_with_a_server_error(archive, path, pairs, raw):
    query = urlencode(pairs) if raw is None else raw
    url = f"{archive.dicomweb_url}/{path}"
    response = requests.get(f"{url}?{query}" if query else url, timeout=30)
    assert response.status_code in (200, 400), (pairs, raw, response.text[:200])
    if response.status_code == 400:
        assert response.text


def test_the_fuzzed_archive_still_answers(known, archive):
    assert unique_ids(search(archive, "studies"), "studies") == unique_ids(known.studies,
                                                                          "studies")

