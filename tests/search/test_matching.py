"""Unit tests for the query model: QIDO-RS keys parsed into a `Query` and the parameterised SQL
`index.query_sql` builds from it."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ricord_archive.errors import BadRequest
from ricord_archive.index.query_sql import Where
from ricord_archive.search.model import Level, Query, Universal, attribute_path, trim_name
from ricord_archive.search.qido import parse_qido

MAX_LIMIT = 100


def parse(max_limit: int = MAX_LIMIT, **params: str) -> Query:
    return parse_qido(Level.STUDY, params.items(), max_limit)


def where_clause(query: Query) -> tuple[str, list]:
    where = Where(query)
    return where.sql, where.values


def conditions(query: Query) -> tuple:
    """The query's matching conditions (universal keys are only returned)."""
    return tuple(t for t in query.terms if not isinstance(t.condition, Universal))


def keyword_of(key: str) -> str | None:
    path = attribute_path(key)
    return path[0] if path else None


def only_condition(**params: str) -> tuple[str, list]:
    """The SQL and bind values of a query with one matching condition."""
    query = parse(**params)
    assert len(conditions(query)) == 1
    return where_clause(query)


def rejected(**params: str) -> None:
    with pytest.raises(BadRequest):
        parse(**params)


# --- keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "keyword"),
    [("PatientName", "PatientName"), ("00100010", "PatientName"),
     ("0020000d", "StudyInstanceUID"), ("0020000D", "StudyInstanceUID")],
)
def test_keyword_of_accepts_keywords_and_tags(key, keyword):
    assert keyword_of(key) == keyword


@pytest.mark.parametrize("key", ["patientname", "NotAKeyword", "0010001", "x", "PatientName."])
def test_keyword_of_rejects_what_is_not_a_dicom_attribute(key):
    assert keyword_of(key) is None


def test_keyword_and_tag_keys_build_the_same_condition():
    assert parse(PatientName="DOE*") == parse_qido(
        Level.STUDY, [("00100010", "DOE*")], MAX_LIMIT
    )


def test_private_and_unknown_tags_are_ignored_not_refused():
    query = parse(**{"00091001": "x"})
    assert conditions(query) == ()
    assert query.ignored == ("00091001 is not a matching key of this archive",)


def test_parameters_that_are_not_dicom_attributes_are_ignored_and_reported():
    query = parse(foo="bar", **{"0010001G": "x", "PatientName.": "y"})
    assert conditions(query) == ()
    assert query.ignored == (
        "'foo' is not a query parameter of this archive",
        "'0010001G' is not a query parameter of this archive",
        "'PatientName.' is not a query parameter of this archive",
    )


def test_keys_of_a_lower_level_or_unmatched_are_ignored_and_reported():
    query = parse(SeriesDescription="chest", BodyPartExamined="CHEST")
    assert conditions(query) == ()
    assert query.ignored == (
        "SeriesDescription is not a matching key at the study level",
        "BodyPartExamined is not a matching key of this archive",
    )


def test_keys_de_identification_removed_match_nothing_but_universal():
    assert only_condition(**{"00081030": "x"}) == ("FALSE", [])  # StudyDescription by tag
    assert conditions(parse(StudyDescription="")) == ()
    assert conditions(parse(StudyDescription="*")) == ()


def test_empty_values_are_return_keys_without_condition():
    query = parse(PatientName="", StudyDate="", StudyDescription="")
    assert conditions(query) == ()
    assert query.ignored == ()


def test_control_parameters_are_not_keys():
    query = parse(includefield="all", fuzzymatching="false", limit="5", offset="1")
    assert conditions(query) == ()
    assert query.ignored == ()
    assert query.returned is None


# --- single value and wildcard matching --------------------------------------------------------


def test_patient_name_matches_case_insensitively():
    assert only_condition(PatientName="Doe") == ("upper(p.pseudonym) = $1", ["DOE"])


def test_patient_id_and_accession_match_exactly():
    assert only_condition(PatientID="Ab1") == ("p.pseudonym = $1", ["Ab1"])
    assert only_condition(AccessionNumber="A1") == ("st.accession_number = $1", ["A1"])


@pytest.mark.parametrize(
    ("value", "pattern"),
    [("Doe*", "DOE%"), ("D?e", "D_E"), ("*x*", "%X%"),
     ("50%*", "50\\%%"), ("a_b*", "A\\_B%"), ("a\\b?", "A\\\\B_")],
)
def test_wildcards_become_like_patterns_with_user_metacharacters_escaped(value, pattern):
    condition = only_condition(PatientName=value)
    assert condition == ("upper(p.pseudonym) LIKE $1", [pattern])


def test_percent_and_underscore_without_wildcards_match_literally():
    assert only_condition(AccessionNumber="5%_") == ("st.accession_number = $1", ["5%_"])


def test_lone_star_is_universal():
    assert conditions(parse(PatientName="*")) == ()


def test_leading_and_trailing_spaces_are_insignificant():
    assert parse(PatientID=" A1  ", StudyDate=" 20200101 ") == parse(
        PatientID="A1", StudyDate="20200101")
    assert conditions(parse(PatientName="   ", AccessionNumber=" * ")) == ()


@pytest.mark.parametrize("value", ["DOE^", "DOE^^^", "DOE=", "DOE^^=^="])
def test_trailing_empty_name_components_are_insignificant(value):
    assert only_condition(PatientName=value) == ("upper(p.pseudonym) = $1", ["DOE"])


def test_a_name_of_empty_components_only_is_universal():
    assert parse(PatientName="^^").terms[0].condition == Universal()
    assert where_clause(parse(PatientName="^^")) == ("TRUE", [])


def test_fuzzy_names_match_word_prefixes_and_keep_wildcards():
    query = parse_qido(Level.STUDY, [("PatientName", "d?e*^"), ("fuzzymatching", "true")],
                        MAX_LIMIT)
    sql, [value] = where_clause(query)
    assert sql == "upper(p.pseudonym) ~ $1"
    pattern = re.compile(value)
    assert pattern.search("JOHN DOE") and pattern.search("SMITH^DAE-BOX")
    assert not pattern.search("JOHNDOE") and not pattern.search("DE^X")
    _, [literal] = where_clause(parse_qido(
        Level.STUDY, [("PatientName", "a.b(c"), ("fuzzymatching", "true")], MAX_LIMIT))
    assert re.compile(literal).search("X A.B(C") and not re.compile(literal).search("AXB(C")


def test_scope_of_the_resource_path_is_anded_with_the_same_key():
    query = parse_qido(Level.SERIES, [("StudyInstanceUID", "1.2")], MAX_LIMIT,
                        {"StudyInstanceUID": "1.3"})
    assert where_clause(query) == (
        "st.study_uid = ANY($1) AND st.study_uid = ANY($2)", [["1.3"], ["1.2"]])


def test_modalities_in_study_overlap_upper_cased():
    condition = only_condition(ModalitiesInStudy="ct,mr\\SR")
    assert condition == ("EXISTS (SELECT 1 FROM study_modality sm WHERE sm.study_pk = st.pk "
                         "AND sm.modality = ANY($1))", [["CT", "MR", "SR"]])


# --- dates -----------------------------------------------------------------------------------


def test_single_date():
    assert only_condition(StudyDate="20200115") == ("st.study_date = $1", [dt.date(2020, 1, 15)])


def test_closed_date_range():
    assert only_condition(StudyDate="20200101-20200131") == (
        "st.study_date BETWEEN $1 AND $2", [dt.date(2020, 1, 1), dt.date(2020, 1, 31)])


def test_open_date_ranges():
    assert only_condition(StudyDate="20200101-") == ("st.study_date >= $1", [dt.date(2020, 1, 1)])
    assert only_condition(StudyDate="-20200131") == ("st.study_date <= $1", [dt.date(2020, 1, 31)])


@pytest.mark.parametrize(
    "value",
    ["2020", "2020-01-15", "20201315", "20200230", "-", "20200101-2020", "abcdefgh",
     "20200101-20200102-20200103", "20200101\n", "\t20200101",
     "\uff12\uff10\uff12\uff10\uff10\uff11\uff10\uff11"],  # full-width digits
)
def test_malformed_dates_are_bad_requests(value):
    rejected(StudyDate=value)


def test_combined_date_and_time_ranges_are_one_date_time_range():
    condition = only_condition(StudyDate="20200101-20200105", StudyTime="1000-0930")
    assert condition == (
        "(st.study_date + coalesce(st.study_time, '00:00')) BETWEEN $1 AND $2",
        [dt.datetime(2020, 1, 1, 10), dt.datetime(2020, 1, 5, 9, 30, 59, 999999)],
    )


def test_combined_open_ranges_keep_their_open_end():
    _, [low] = only_condition(StudyDate="20200101-", StudyTime="10-")
    assert low == dt.datetime(2020, 1, 1, 10)
    _, [high] = only_condition(StudyDate="-20200105", StudyTime="1000-12")
    assert high == dt.datetime(2020, 1, 5, 12, 59, 59, 999999)


def test_single_date_and_time_values_match_separately():
    assert len(conditions(parse(StudyDate="20200101", StudyTime="1000"))) == 2


@pytest.mark.parametrize(("date", "time", "named"), [
    ("20200101-20200102", "25-", "StudyTime"), ("-20200102", "x-1000", "StudyTime"),
    ("2020-20200102", "10-11", "StudyDate"),
])
def test_combined_ranges_name_the_malformed_key(date, time, named):
    with pytest.raises(BadRequest, match=named):
        parse(StudyDate=date, StudyTime=time)


# --- UID lists ---------------------------------------------------------------------------------


def test_uid_list_by_comma_and_backslash():
    condition = only_condition(StudyInstanceUID="1.2.3, 2.25.4\\1.2.840.10008.5")
    uids = ["1.2.3", "2.25.4", "1.2.840.10008.5"]
    assert condition == ("st.study_uid = ANY($1)", [uids])


@pytest.mark.parametrize(
    "value", ["1.2.abc", "1..2", ".1.2", "1.2.", "1.2.*", ",", "1.2;DROP TABLE study", "1" * 65]
)
def test_invalid_uids_are_bad_requests(value):
    rejected(StudyInstanceUID=value)


def test_uid_of_64_characters_is_accepted():
    uid = "1." + "2" * 62
    assert only_condition(StudyInstanceUID=uid)[1] == [[uid]]


# --- limit, offset and value limits -----------------------------------------------------------


def test_limit_defaults_to_max_and_offset_to_zero():
    query = parse()
    assert (query.limit, query.offset) == (MAX_LIMIT, 0)


def test_limit_and_offset_are_parsed():
    query = parse(limit="10", offset="20")
    assert (query.limit, query.offset) == (10, 20)


def test_limit_is_capped_at_max_limit():
    assert parse(limit="5000").limit == MAX_LIMIT
    assert parse(max_limit=7, limit="8").limit == 7


@pytest.mark.parametrize("value", ["-1", "1.5", "ten", " 5", "1234567890", "²", "٣"])
def test_bad_limits_and_offsets_are_bad_requests(value):
    rejected(limit=value)
    rejected(offset=value)


def test_nul_in_value_is_a_bad_request():
    rejected(PatientName="DOE\x00")
    rejected(SeriesDescription="\x00")  # even for a key that is then ignored


def test_overlong_value_is_a_bad_request():
    rejected(AccessionNumber="A" * 1025)
    assert only_condition(AccessionNumber="A" * 1024)[1] == ["A" * 1024]


# --- where_clause -------------------------------------------------------------------------------


def test_where_clause_without_conditions():
    assert where_clause(Query(Level.STUDY)) == ("TRUE", [])


def test_where_clause_numbers_placeholders_in_order():
    query = parse(
        PatientID="P1", PatientName="*", StudyDate="20200101-20200131", StudyInstanceUID="1.2,1.3"
    )
    sql, values = where_clause(query)
    assert sql == (  # the keys in the archive's order (KEYS), whatever the request's
        "p.pseudonym = $1 AND st.study_uid = ANY($2) "
        "AND st.study_date BETWEEN $3 AND $4"
    )
    assert values == ["P1", ["1.2", "1.3"], dt.date(2020, 1, 1), dt.date(2020, 1, 31)]


def test_where_clause_binds_the_site_last():
    query = replace(parse(PatientID="P1", AccessionNumber="A*"), site_id=7)
    sql, values = where_clause(query)
    assert sql == "p.pseudonym = $1 AND st.accession_number LIKE $2 AND st.site_id = $3"
    assert values == ["P1", "A%", 7]


# --- user input never becomes SQL text (property) -------------------------------------------


def expected_sql(column: str, value: str) -> str:
    """The SQL a value must produce: it depends on the kind of match only, never the content."""
    return f"{column} {'LIKE' if '*' in value or '?' in value else '='} $1"


@settings(max_examples=300, deadline=None, derandomize=True)
@given(name=st.text(max_size=1100), accession=st.text(max_size=1100))
def test_user_values_only_travel_as_bind_values(name, accession):
    params = {"PatientName": name, "AccessionNumber": accession}
    try:
        query = parse_qido(Level.STUDY, params.items(), MAX_LIMIT)
    except BadRequest:
        assert any(len(v) > 1024 or "\x00" in v for v in params.values())
        return
    all_values = []
    for keyword, column in (("PatientName", "upper(p.pseudonym)"),
                            ("AccessionNumber", "st.accession_number")):
        value = params[keyword].strip(" ")  # surrounding spaces are insignificant
        if value not in ("", "*"):
            single = parse_qido(Level.STUDY, [(keyword, value)], MAX_LIMIT)
            sql, values = where_clause(single)
            if keyword == "PatientName":
                value = trim_name(value)  # "DOE^" is "DOE"; "^" alone matches everything
            assert sql == (expected_sql(column, value) if value else "TRUE")
            assert value not in sql or value in expected_sql(column, "x")
            all_values.extend(values)
    sql, values = where_clause(query)
    assert re.fullmatch(
        r"TRUE|(TRUE|upper\(p\.pseudonym\) (=|LIKE) \$1|st\.accession_number (=|LIKE) \$1)"
        r"( AND st\.accession_number (=|LIKE) \$\d)?",
        sql,
    ), sql
    assert len(re.findall(r"\$\d+", sql)) == len(values) == len(all_values)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(raw=st.text(max_size=12))
def test_limit_parsing_never_fails_other_than_bad_request(raw):
    try:
        limit = parse(limit=raw).limit
    except BadRequest:
        assert not re.fullmatch(r"[0-9]{1,9}", raw)
        return
    assert 0 <= limit <= MAX_LIMIT
