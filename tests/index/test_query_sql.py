"""Unit tests for the one translation of the query model into SQL (`index.query_sql`): one
builder per condition type, the joins a statement needs derived from the columns it reads,
scope, site and paging binds, and user input only ever as bind values."""

from __future__ import annotations

import datetime as dt

import pytest

from ricord_archive.index.query_sql import (
    COUNT_CAP,
    Where,
    column,
    from_clause,
    matches_sql,
    page_sql,
    rest_count_sql,
)
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

HOSTILE = "x'); DROP TABLE study; --"


def where(level: Level, *terms: Term, **fields) -> tuple[str, list]:
    found = Where(Query(level, terms, **fields))
    return found.sql, found.values


def test_every_stored_key_has_a_column_and_no_removed_key_has_one():
    for level in Level:
        for key in KEYS.values():
            assert (column(key.path, level) is not None) == key.stored, (key.path, level)


@pytest.mark.parametrize(("term", "sql", "values"), [
    (Term("AccessionNumber", SingleValue("A1")), "st.accession_number = $1", ["A1"]),
    (Term("PatientName", SingleValue("doe", ignore_case=True)),
     "upper(p.pseudonym) = $1", ["DOE"]),
    (Term("AccessionNumber", Wildcard("a_%*?\\")), "st.accession_number LIKE $1",
     ["a\\_\\%%_\\\\"]),
    (Term("PatientName", Wildcard("do*", ignore_case=True)), "upper(p.pseudonym) LIKE $1",
     ["DO%"]),
    (Term("StudyDate", SingleValue(dt.date(2020, 1, 2))), "st.study_date = $1",
     [dt.date(2020, 1, 2)]),
    (Term("StudyDate", Range(dt.date(2020, 1, 1), None)), "st.study_date >= $1",
     [dt.date(2020, 1, 1)]),
    (Term("StudyTime", Range(None, dt.time(9))), "st.study_time <= $1", [dt.time(9)]),
    (Term("StudyTime", Range(dt.time(8), dt.time(9))), "st.study_time BETWEEN $1 AND $2",
     [dt.time(8), dt.time(9)]),
    (Term("StudyDate", DateTimeRange("StudyTime", dt.datetime(2020, 1, 1, 8), None)),
     "(st.study_date + coalesce(st.study_time, '00:00')) >= $1", [dt.datetime(2020, 1, 1, 8)]),
    (Term("StudyInstanceUID", UidList(("1.2", "1.3"))), "st.study_uid = ANY($1)",
     [["1.2", "1.3"]]),
    (Term("ModalitiesInStudy", AnyOf(("CT",))),
     "st.pk IN (SELECT sm.study_pk FROM study_modality sm WHERE sm.modality = $1)", ["CT"]),
    (Term("ModalitiesInStudy", AnyOf(("CT", "MR", "CT"))),
     "EXISTS (SELECT 1 FROM study_modality sm WHERE sm.study_pk = st.pk "
     "AND sm.modality = ANY($1))", [["CT", "MR"]]),
    (Term("InstanceNumber", AnyOf((1, 2))), "i.instance_number = ANY($1)", [[1, 2]]),
    (Term("PatientName", Fuzzy("d?e*")), "upper(p.pseudonym) ~ $1", ["(^|[\\^ =-])D.E.*"]),
    (Term("StudyDescription", SingleValue("chest")), "FALSE", []),
    (Term("PatientBirthDate", Wildcard("19*")), "FALSE", []),
    (Term("StudyDescription", Universal()), "TRUE", []),
    (Term("PatientID", Universal()), "TRUE", []),
])
def test_one_builder_per_condition_type(term, sql, values):
    assert where(Level.INSTANCE, term) == (sql, values)


def test_the_site_id_key_is_matched_on_the_site_table_at_the_level_s_column():
    term = Term("ClinicalTrialSiteID", Wildcard("A*"))
    assert where(Level.PATIENT, term) == (
        "p.site_id IN (SELECT id FROM site WHERE siteid LIKE $1)", ["A%"])
    assert where(Level.SERIES, term) == (
        "st.site_id IN (SELECT id FROM site WHERE siteid LIKE $1)", ["A%"])
    # one site: an equality the (site_id, pk) index serves in key order
    one = Term("ClinicalTrialSiteID", SingleValue("200001"))
    assert where(Level.STUDY, one) == (
        "st.site_id = (SELECT id FROM site WHERE siteid = $1)", ["200001"])


def test_scope_comes_first_and_the_site_restriction_last():
    query = Query(Level.INSTANCE, (Term("InstanceNumber", AnyOf((3,))),),
                  scope=Scope(("1.2",), ("1.2.3",)), site_id=4)
    found = Where(query)
    assert found.sql == ("st.study_uid = ANY($1) AND se.series_uid = ANY($2) "
                         "AND i.instance_number = ANY($3) AND st.site_id = $4")
    assert found.values == [["1.2"], ["1.2.3"], [3], 4]
    assert where(Level.PATIENT, site_id=4) == ("p.site_id = $1", [4])


@pytest.mark.parametrize(("level", "tables", "joins"), [
    (Level.PATIENT, {"p"}, "FROM patient p"),
    (Level.STUDY, set(), "FROM study st"),
    (Level.STUDY, {"p"}, "FROM study st JOIN patient p ON p.pk = st.patient_pk"),
    (Level.SERIES, {"p"}, "FROM series se JOIN study st ON st.pk = se.study_pk "
                          "JOIN patient p ON p.pk = st.patient_pk"),
    (Level.INSTANCE, {"se"}, "FROM instance i JOIN series se ON se.pk = i.series_pk"),
    (Level.INSTANCE, {"p"}, "FROM instance i JOIN study st ON st.pk = i.study_pk "
                            "JOIN patient p ON p.pk = st.patient_pk"),
])
def test_joins_reach_each_table_through_its_parent(level, tables, joins):
    assert from_clause(level, tables) == joins


def test_a_statement_joins_only_what_its_terms_read():
    assert Where(Query(Level.INSTANCE, (Term("Modality", SingleValue("CT")),))).tables == {"se"}
    assert Where(Query(Level.INSTANCE, (Term("PatientID", Universal()),
                                        Term("StudyDescription", SingleValue("x"))))).tables \
        == set()
    query = Query(Level.INSTANCE, (Term("PatientName", SingleValue("A", ignore_case=True)),),
                  limit=5, offset=10)
    sql, values = rest_count_sql(query, 77, [5, 6])
    assert "FROM instance i JOIN study st ON st.pk = i.study_pk JOIN patient p" in sql
    assert "series" not in sql
    assert "i.study_pk = ANY($2::bigint[]) AND i.pk > $3" in sql and "OFFSET" not in sql
    assert values == ["A", [5, 6], 77, COUNT_CAP]


def test_a_count_on_modalities_alone_reads_study_modality_only():
    modalities = Term("ModalitiesInStudy", AnyOf(("CR", "PT")))
    sql, values = rest_count_sql(Query(Level.STUDY, (modalities,)), 77)
    assert sql == (
        "SELECT least(count(DISTINCT m.study_pk), $5) FROM ("
        "(SELECT sm.study_pk FROM study_modality sm WHERE sm.modality = $3 "
        "AND sm.study_pk > $1 ORDER BY sm.study_pk LIMIT $2) UNION ALL "
        "(SELECT sm.study_pk FROM study_modality sm WHERE sm.modality = $4 "
        "AND sm.study_pk > $1 ORDER BY sm.study_pk LIMIT $2)) AS m")
    assert values == [77, COUNT_CAP, "CR", "PT", COUNT_CAP]
    # a page's ranges stop at the keys it may read (offset, limit and one more)
    page, page_values = page_sql(Query(Level.STUDY, (modalities,), limit=5, offset=10))
    assert "ORDER BY sm.study_pk LIMIT $1)" in page and page_values[0] == 16
    one, _ = rest_count_sql(Query(Level.STUDY, (Term("ModalitiesInStudy", AnyOf(("PT",))),)),
                            77)
    assert one == ("SELECT count(*) FROM (SELECT sm.study_pk FROM study_modality sm "
                   "WHERE sm.modality = $2 AND sm.study_pk > $1 LIMIT $3) AS rest")
    # anything else narrowing the studies needs the study table
    for query in [Query(Level.STUDY, (modalities,), site_id=4),
                  Query(Level.STUDY, (modalities, Term("AccessionNumber", SingleValue("A")))),
                  Query(Level.SERIES, (modalities,))]:
        assert " study st " in rest_count_sql(query, 77)[0], query


def test_a_page_selects_its_level_s_documents_and_binds_paging_last():
    query = Query(Level.SERIES, (Term("PatientID", SingleValue("P")),), limit=25, offset=50)
    sql, values = page_sql(query)
    assert sql.startswith(
        "SELECT page.*, counts.* FROM (SELECT se.pk AS page_key, st.dicom_json AS study_json, "
        "se.dicom_json AS series_json FROM series se JOIN study st ON st.pk = se.study_pk "
        "JOIN patient p ON p.pk = st.patient_pk WHERE p.pseudonym = $1 ORDER BY se.pk "
        "LIMIT $2 OFFSET $3) AS page")
    assert values == ["P", 26, 50]
    instances, _ = page_sql(Query(Level.INSTANCE, limit=1))
    assert "JOIN series se" in instances and "JOIN study st" in instances
    assert "instance_tally" not in instances


def test_matches_select_the_level_s_key_unpaged():
    query = Query(Level.SERIES, (Term("StudyInstanceUID", UidList(("1.2",))),))
    assert matches_sql(query) == (
        "SELECT se.pk AS pk FROM series se JOIN study st ON st.pk = se.study_pk "
        "WHERE st.study_uid = ANY($1) ORDER BY se.pk", [["1.2"]])


@pytest.mark.parametrize("condition", [
    SingleValue(HOSTILE), SingleValue(HOSTILE, ignore_case=True), Wildcard(HOSTILE + "*"),
    Fuzzy(HOSTILE), AnyOf((HOSTILE,)), UidList((HOSTILE,)),
])
def test_user_values_never_become_sql_text(condition):
    for key in ("PatientName", "AccessionNumber", "ModalitiesInStudy", "ClinicalTrialSiteID"):
        sql, values = where(Level.STUDY, Term(key, condition))
        assert "DROP" not in sql and ";" not in sql
        assert any("DROP" in str(value).upper() for value in values)
