"""Unit tests for the two parsers of the query model: QIDO-RS parameters and C-FIND identifiers,
each from its own input, into one `Query`; the same question asked both ways is the same Query."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

import pytest
from pydicom.dataset import Dataset

from ricord_archive.dimse.find_query import identifier_keys, parse_identifier
from ricord_archive.errors import BadRequest
from ricord_archive.search.model import (
    KEYS,
    AnyOf,
    DateTimeRange,
    Fuzzy,
    Level,
    Query,
    Range,
    Scope,
    SingleValue,
    Term,
    UidList,
    Universal,
    Wildcard,
)
from ricord_archive.search.qido import parse_qido

MAX_LIMIT = 100


def qido(level: Level = Level.STUDY, scope: dict | None = None, **params: str) -> Query:
    return parse_qido(level, params.items(), MAX_LIMIT, scope)


def identifier(level: str = "STUDY", **keys: object) -> Dataset:
    dataset = Dataset()
    dataset.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(dataset, keyword, value)
    return dataset


def cfind(level: Level = Level.STUDY, **keys: object) -> Query:
    name = "IMAGE" if level is Level.INSTANCE else level.name
    return parse_identifier(level, identifier(name, **keys), MAX_LIMIT)


def terms(query: Query) -> dict[str, object]:
    return {term.key: term.condition for term in query.terms}


# --- QIDO-RS: one condition type per matching type --------------------------------------------


def test_qido_builds_each_matching_type():
    query = qido(
        PatientName="doe*", PatientID="P1", StudyInstanceUID="1.2,1.3", StudyDate="20200101-",
        ModalitiesInStudy="ct\\MR", AccessionNumber="",
    )
    assert terms(query) == {
        "PatientName": Wildcard("doe*", ignore_case=True),
        "PatientID": SingleValue("P1"),
        "StudyInstanceUID": UidList(("1.2", "1.3")),
        "StudyDate": Range(dt.date(2020, 1, 1), None),
        "ModalitiesInStudy": AnyOf(("CT", "MR")),
        "AccessionNumber": Universal(),
    }
    assert terms(qido(StudyTime="10")) == {
        "StudyTime": Range(dt.time(10), dt.time(10, 59, 59, 999999))}


def test_qido_integers_and_single_dates():
    query = qido(Level.SERIES, SeriesNumber="3\\4", PerformedProcedureStepStartDate="20200102")
    assert terms(query) == {"SeriesNumber": AnyOf((3, 4)),
                            "PerformedProcedureStepStartDate": SingleValue(dt.date(2020, 1, 2))}


def test_qido_combined_date_and_time_range_is_one_term_on_the_date_key():
    query = qido(StudyDate="20200101-20200102", StudyTime="0800-", PatientID="P")
    assert query.terms == (  # in the order of the archive's keys, not the request's
        Term("PatientID", SingleValue("P")),
        Term("StudyDate", DateTimeRange("StudyTime", dt.datetime(2020, 1, 1, 8),
                                        dt.datetime(2020, 1, 2, 23, 59, 59, 999999))),
    )
    assert qido_pairs([("PatientID", "P"), ("StudyTime", "0800-"),
                       ("StudyDate", "20200101-20200102")]) == query


def test_qido_fuzzy_names():
    query = qido(PatientName="Do^", PatientID="x*", fuzzymatching="TRUE")
    assert query.fuzzy
    assert terms(query) == {"PatientName": Fuzzy("Do"), "PatientID": Wildcard("x*")}


def test_qido_keys_the_archive_does_not_keep_are_not_read():
    """A date de-identification removed is never parsed: it matches nothing, it is no error."""
    query = qido(PatientBirthDate="not a date", StudyDescription="chest*")
    assert terms(query) == {"PatientBirthDate": SingleValue("not a date"),
                            "StudyDescription": Wildcard("chest*")}


def test_qido_a_later_value_replaces_an_earlier_one_a_universal_never_does():
    assert terms(qido_pairs([("PatientID", "A"), ("PatientID", "B")])) == {
        "PatientID": SingleValue("B")}
    assert terms(qido_pairs([("PatientID", "A"), ("PatientID", "")])) == {
        "PatientID": SingleValue("A")}


def qido_pairs(pairs: list[tuple[str, str]]) -> Query:
    return parse_qido(Level.STUDY, pairs, MAX_LIMIT)


def test_qido_scope_paging_and_returned_keys():
    query = parse_qido(
        Level.INSTANCE,
        [("includefield", "SliceThickness,00280010"), ("limit", "7"), ("offset", "3")],
        MAX_LIMIT, {"StudyInstanceUID": "1.2", "SeriesInstanceUID": "1.2.3"},
    )
    assert query.scope == Scope(("1.2",), ("1.2.3",))
    assert query.returned == frozenset({"00180050", "00280010"})
    assert (query.limit, query.offset, query.terms) == (7, 3, ())


@pytest.mark.parametrize(("scope", "message"), [
    ({"StudyInstanceUID": "1.2*"}, "wildcards are not allowed"),
    ({"StudyInstanceUID": "1.x"}, "expected one or more UIDs"),
])
def test_qido_malformed_scope_is_a_bad_request(scope, message):
    with pytest.raises(BadRequest, match=message):
        qido(Level.SERIES, scope)


# --- C-FIND: from the identifier's elements ----------------------------------------------------


def test_cfind_builds_each_matching_type_from_elements():
    query = cfind(PatientName="DOE*", StudyInstanceUID=["1.2", "1.3"], StudyDate="20200101",
                  ModalitiesInStudy=["CT", "MR"], AccessionNumber="", PatientSex="F")
    assert terms(query) == {
        "PatientName": Wildcard("DOE*", ignore_case=True),
        "StudyInstanceUID": UidList(("1.2", "1.3")),
        "StudyDate": SingleValue(dt.date(2020, 1, 1)),
        "ModalitiesInStudy": AnyOf(("CT", "MR")),
        "AccessionNumber": Universal(),
        "PatientSex": SingleValue("F"),
    }
    assert terms(cfind(StudyTime="-1230")) == {
        "StudyTime": Range(None, dt.time(12, 30, 59, 999999))}


def test_cfind_every_key_is_returned_and_control_elements_are_not_keys():
    dataset = identifier("STUDY", PatientID="", StudyDescription="")
    dataset.SpecificCharacterSet = "ISO_IR 100"
    query = parse_identifier(Level.STUDY, dataset, MAX_LIMIT)
    assert query.returned == frozenset({"00100020", "00081030"})
    assert query.terms == (Term("PatientID", Universal()), Term("StudyDescription", Universal()))
    assert (query.limit, query.offset, query.fuzzy, query.scope) == (MAX_LIMIT, 0, False, Scope())


def test_cfind_sequence_keys_match_on_their_first_item():
    item = Dataset()
    item.PatientID = "X*"
    dataset = identifier("PATIENT", OtherPatientIDsSequence=[item], PatientName="")
    assert list(identifier_keys(dataset)) == [
        ("PatientName", ""), ("OtherPatientIDsSequence.PatientID", "X*")]
    empty = identifier("PATIENT", OtherPatientIDsSequence=[])
    assert list(identifier_keys(empty)) == [("OtherPatientIDsSequence", "")]


def test_cfind_keys_of_a_lower_level_and_unmatched_keys_are_ignored():
    query = cfind(SeriesDescription="x", BodyPartExamined="CHEST")
    assert query.terms == ()
    assert query.ignored == ("SeriesDescription is not a matching key at the study level",
                             "BodyPartExamined is not a matching key of this archive")
    assert query.returned == frozenset({"00180015", "0008103E"})


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # pydicom, on setting them
def test_cfind_malformed_values_are_bad_requests():
    with pytest.raises(BadRequest, match="StudyDate"):
        cfind(StudyDate="2020")
    with pytest.raises(BadRequest, match="wildcards are not allowed"):
        cfind(Level.INSTANCE, SOPInstanceUID="1.2*")


# --- the same question, asked by QIDO-RS and by C-FIND -----------------------------------------


QUESTIONS = [
    (Level.STUDY,
     {"PatientID": "P1", "PatientName": "", "StudyDate": "20200101-20200131",
      "StudyTime": "", "ModalitiesInStudy": ["CT", "MR"], "StudyInstanceUID": ""}),
    (Level.STUDY,
     {"PatientName": "do*^", "StudyDate": "20200101-", "StudyTime": "0800-1700",
      "AccessionNumber": "A?1", "BodyPartExamined": "CHEST"}),
    (Level.SERIES,
     {"StudyInstanceUID": ["1.2.3", "1.2.4"], "Modality": "CT", "SeriesNumber": "2",
      "SeriesInstanceUID": "", "PerformedProcedureStepStartDate": "-20210101"}),
    (Level.INSTANCE,
     {"SeriesInstanceUID": "1.2.3.4", "InstanceNumber": "", "SOPClassUID": "1.2.840.10008.1",
      "StudyDescription": "x", "SliceThickness": ""}),
    (Level.PATIENT,
     {"PatientID": "*", "ClinicalTrialSiteID": "SITE*", "PatientBirthDate": ""}),
]


@pytest.mark.parametrize(("level", "keys"), QUESTIONS)
def test_qido_and_cfind_ask_the_same_question_alike(level, keys):
    params = [(keyword, "\\".join(value) if isinstance(value, list) else value)
              for keyword, value in keys.items()]
    params.append(("includefield", ",".join(keys)))
    from_qido = parse_qido(level, params, MAX_LIMIT)
    from_cfind = cfind(level, **keys)  # an identifier's elements come in tag order
    assert replace(from_qido, ignored=()) == replace(from_cfind, ignored=())
    assert sorted(from_qido.ignored) == sorted(from_cfind.ignored)
    assert any(not isinstance(t.condition, Universal) for t in from_qido.terms)
    assert {t.key for t in from_qido.terms} <= set(KEYS)
