"""Searches that do not scan (issue #18, migrations/015) on the embedded PostgreSQL, through the
real store function: keyset pages walk every match once in order while studies arrive, SITEID
and ModalitiesInStudy answer what a brute-force reading of the tables answers, the trigger
keeps study_modality current, the count past a page is bounded, and an instance search reads
only the partitions of the studies it resolves (or is refused)."""

from __future__ import annotations

import re
from dataclasses import replace

import asyncpg
import pytest

from ricord_archive.config import SiteConfig
from ricord_archive.errors import QueryTooBroad
from ricord_archive.index import query_sql
from ricord_archive.index.migrate import load_migrations, migrate
from ricord_archive.index.query_sql import COUNT_CAP, STUDY_CAP, page_sql, rest_count_sql
from ricord_archive.index.search import search
from ricord_archive.index.store import ensure_site
from ricord_archive.search.model import (
    AnyOf,
    Level,
    Query,
    Scope,
    SingleValue,
    Term,
    UidList,
    Wildcard,
)
from tests.index import test_index_store
from tests.index.test_index_store import ROOT, Index, instance

index = test_index_store.index  # the fixture: a freshly migrated database per test

# Study n of the corpus: its patient, and the modalities of its series (one series each).
STUDIES = 24
MODALITIES = ("CT", "MR", "CR", "PT")


def modalities_of(n: int) -> tuple[str, ...]:
    first = MODALITIES[n % 3]  # CT, MR, CR in turn
    return (first, "PT") if n % 7 == 0 else (first,)


def numbered(n: int, k: int, modality: str) -> object:
    """Instance k of study n, its documents naming n and k (so answers tell studies apart)."""
    new = instance(n, n * 10 + k, n * 100 + k, modality)
    return replace(new, study_json=f'{{"study": {n}}}'.encode(),
                   series_json=f'{{"series": {n * 10 + k}}}'.encode(),
                   instance_json=f'{{"instance": {n * 100 + k}}}'.encode())


async def load(ix: Index, studies: range, site_b: Index | None = None) -> None:
    """Study n at site A (site B for odd n when given), patient n // 2 of its site."""
    for n in studies:
        target = site_b if (site_b is not None and n % 2) else ix
        patient = await target.patient(bytes([n // 2 + 1]) * 32)
        for k, modality in enumerate(modalities_of(n)):
            await target.store(patient, numbered(n, k, modality))


async def two_sites(ix: Index) -> Index:
    async with ix.pool.acquire() as conn:
        return Index(ix.pool, await ensure_site(conn, SiteConfig("site-b")))


def test_keyset_pages_walk_every_match_once_in_order_while_studies_arrive(index):
    async def scenario(ix: Index) -> None:
        await load(ix, range(STUDIES))
        seen: list[bytes] = []
        after, arrived = None, 0
        while True:
            page = await search(ix.pool, Query(Level.STUDY, limit=5, after=after))
            seen += [row.study_json for row in page.rows]
            total = await ix.pool.fetchval("SELECT count(*) FROM study")
            assert page.more == total - len(seen)  # exact below the cap
            if page.last_key is None:
                break
            assert await ix.pool.fetchval("SELECT dicom_json FROM study WHERE pk = $1",
                                          page.last_key) == seen[-1]
            after = page.last_key
            if arrived < 2:  # a new study between pages: found once, at its place in order
                await load(ix, range(100 + arrived, 101 + arrived))
                arrived += 1
        everything = [r["dicom_json"] for r in await ix.pool.fetch(
            "SELECT dicom_json FROM study ORDER BY pk")]
        assert seen == everything and len(everything) == STUDIES + 2

    index(scenario)


def test_keyset_walks_equal_the_unpaged_answer_at_every_level_and_with_filters(index):
    async def scenario(ix: Index) -> None:
        b = await two_sites(ix)
        await load(ix, range(STUDIES), b)
        queries = [
            Query(Level.PATIENT, limit=4),
            Query(Level.STUDY, (Term("ModalitiesInStudy", AnyOf(("CT",))),), limit=3),
            Query(Level.STUDY, (Term("ModalitiesInStudy", AnyOf(("PT", "MR"))),), limit=2),
            Query(Level.STUDY, (Term("ClinicalTrialSiteID", SingleValue(b.site.siteid)),),
                  limit=4),
            Query(Level.SERIES, (Term("Modality", SingleValue("CT")),), limit=3),
            Query(Level.INSTANCE, (Term("ModalitiesInStudy", AnyOf(("MR",))),), limit=2),
        ]
        for query in queries:
            unpaged = await search(ix.pool, replace(query, limit=1000))
            documents, after, pages = [], None, 0
            while True:
                page = await search(ix.pool, replace(query, after=after))
                documents += page.rows
                pages += 1
                if page.last_key is None:
                    break
                after = page.last_key
            assert documents == unpaged.rows, query
            assert pages > 1, query

    index(scenario)


async def brute_force_studies(pool: asyncpg.Pool, modalities: tuple[str, ...] | None,
                              siteid: str | None) -> list[bytes]:
    """The studies' documents in study order, filtered in Python from every row."""
    rows = await pool.fetch("SELECT st.dicom_json, st.modalities, site.siteid FROM study st "
                            "JOIN site ON site.id = st.site_id ORDER BY st.pk")
    return [r["dicom_json"] for r in rows
            if (modalities is None or set(modalities) & set(r["modalities"]))
            and (siteid is None or r["siteid"] == siteid)]


def test_site_and_modalities_answer_what_a_brute_force_reading_answers(index):
    async def scenario(ix: Index) -> None:
        b = await two_sites(ix)
        await load(ix, range(STUDIES), b)
        for modalities in [None, ("CT",), ("PT",), ("MR", "PT"), ("CR", "CT", "MR"), ("US",)]:
            for siteid in [None, ix.site.siteid, b.site.siteid]:
                terms = []
                if modalities:
                    terms.append(Term("ModalitiesInStudy", AnyOf(modalities)))
                if siteid:
                    terms.append(Term("ClinicalTrialSiteID", SingleValue(siteid)))
                page = await search(ix.pool, Query(Level.STUDY, tuple(terms), limit=1000))
                expected = await brute_force_studies(ix.pool, modalities, siteid)
                assert [row.study_json for row in page.rows] == expected, (modalities, siteid)
        # patients of a site, and sites by wildcard
        for siteid in [ix.site.siteid, b.site.siteid]:
            page = await search(ix.pool, Query(
                Level.PATIENT, (Term("ClinicalTrialSiteID", SingleValue(siteid)),), limit=1000))
            expected = await ix.pool.fetchval(
                "SELECT count(*) FROM patient p JOIN site ON site.id = p.site_id "
                "WHERE site.siteid = $1", siteid)
            assert len(page.rows) == expected > 0
        everything = await search(ix.pool, Query(
            Level.STUDY, (Term("ClinicalTrialSiteID", Wildcard("*")),), limit=1000))
        assert len(everything.rows) == STUDIES

    index(scenario)


def test_the_trigger_keeps_study_modality_current_and_015_fills_it(index):
    async def scenario(ix: Index) -> None:
        await load(ix, range(3))
        patient = await ix.patient(bytes([1]) * 32)
        await ix.store(patient, instance(0, 999, 9999, "US"))  # study 0 gains a modality
        pairs = {(r["modality"], r["study_pk"]) for r in await ix.pool.fetch(
            "SELECT modality, study_pk FROM study_modality")}
        expected = {(m, r["pk"]) for r in await ix.pool.fetch(
            "SELECT pk, modalities FROM study") for m in r["modalities"]}
        assert pairs == expected and ("US", await ix.pool.fetchval(
            "SELECT pk FROM study WHERE study_uid = $1", f"{ROOT}.1.0")) in pairs
        page = await search(ix.pool, Query(
            Level.STUDY, (Term("ModalitiesInStudy", AnyOf(("US",))),), limit=10))
        assert len(page.rows) == 1 and "US" in page.rows[0].modalities

    index(scenario)


def test_migration_015_fills_study_modality_from_an_existing_index(index):
    before = [m for m in load_migrations() if m.version < 15]

    async def scenario(ix: Index) -> None:
        await load(ix, range(8))
        async with ix.pool.acquire() as conn:
            assert await migrate(conn) >= 1
        count = await ix.pool.fetchval("SELECT count(*) FROM study_modality")
        assert count == sum(len(modalities_of(n)) for n in range(8))

    index(scenario, migrations=before)


def test_the_count_past_a_page_starts_at_its_last_key_and_stops_at_the_cap(index):
    async def scenario(ix: Index) -> None:
        await load(ix, range(6))
        page = await search(ix.pool, Query(Level.STUDY, limit=2, offset=1))
        assert page.more == 3  # 6 studies, one skipped, two on the page
        sql, arguments = rest_count_sql(Query(Level.STUDY, limit=2), page.last_key or 0)
        assert "OFFSET" not in sql and arguments[-1] == COUNT_CAP

    index(scenario)


def test_every_page_s_count_is_what_remains_of_a_brute_force_reading(index, monkeypatch):
    """Modality lists (a study holding both of MR and PT among them) and single modalities,
    alone (counted on study_modality) and with a site (counted on study): each page's count is
    the matches past it, and stops at the cap."""
    async def scenario(ix: Index) -> None:
        b = await two_sites(ix)
        await load(ix, range(STUDIES), b)
        for cap in (COUNT_CAP, 2):
            monkeypatch.setattr(query_sql, "COUNT_CAP", cap)
            for modalities in [("PT",), ("MR", "PT"), ("PT", "MR", "PT"), ("CR", "CT", "MR")]:
                for siteid in [None, b.site.siteid]:
                    terms = [Term("ModalitiesInStudy", AnyOf(modalities))]
                    if siteid:
                        terms.append(Term("ClinicalTrialSiteID", SingleValue(siteid)))
                    expected = await brute_force_studies(ix.pool, modalities, siteid)
                    seen, after = 0, None
                    while True:
                        page = await search(ix.pool, Query(Level.STUDY, tuple(terms), limit=2,
                                                           after=after))
                        assert [r.study_json for r in page.rows] == expected[seen:seen + 2]
                        seen += len(page.rows)
                        assert page.more == min(len(expected) - seen, cap), (modalities, siteid)
                        if page.last_key is None:
                            break
                        after = page.last_key
                    assert seen == len(expected) > 0

    index(scenario)


# --- instance searches: resolved studies, pruned partitions ----------------------------------

def uids(n: int) -> tuple[str, str, str]:
    return f"{ROOT}.1.{n}", f"{ROOT}.2.{n * 10}", f"{ROOT}.3.{n * 100}"


def test_instance_searches_are_narrowed_by_each_kind_of_term(index):
    async def scenario(ix: Index) -> None:
        await load(ix, range(6))
        study, series, sop = uids(4)
        pseudonym = await ix.pool.fetchval(
            "SELECT p.pseudonym FROM patient p JOIN study st ON st.patient_pk = p.pk "
            "WHERE st.study_uid = $1", study)
        narrowings = {
            "scope": Query(Level.INSTANCE, scope=Scope((study,)), limit=50),
            "StudyInstanceUID": Query(Level.INSTANCE, (Term("StudyInstanceUID",
                                                            UidList((study,))),), limit=50),
            "SeriesInstanceUID": Query(Level.INSTANCE, (Term("SeriesInstanceUID",
                                                             UidList((series,))),), limit=50),
            "SOPInstanceUID": Query(Level.INSTANCE, (Term("SOPInstanceUID",
                                                          UidList((sop,))),), limit=50),
        }
        for name, query in narrowings.items():
            page = await search(ix.pool, query)
            assert [row.instance_json for row in page.rows] == [b'{"instance": 400}'], name
        by_patient = await search(ix.pool, Query(
            Level.INSTANCE, (Term("PatientID", SingleValue(pseudonym)),), limit=50))
        patient_studies = await ix.pool.fetchval(
            "SELECT count(*) FROM instance i JOIN study st ON st.pk = i.study_pk "
            "JOIN patient p ON p.pk = st.patient_pk WHERE p.pseudonym = $1", pseudonym)
        assert len(by_patient.rows) == patient_studies == 2  # studies 4 and 5, one each
        for broad in [Query(Level.INSTANCE, limit=5),
                      Query(Level.INSTANCE, (Term("Modality", SingleValue("CT")),), limit=5),
                      Query(Level.INSTANCE, site_id=ix.site.id, limit=5)]:
            with pytest.raises(QueryTooBroad, match="name its studies"):
                await search(ix.pool, broad)

    index(scenario)


def test_an_instance_search_matching_more_studies_than_the_cap_is_refused(index):
    async def scenario(ix: Index) -> None:
        await load(ix, range(STUDY_CAP + 1))
        on_date = Query(Level.INSTANCE, (Term("StudyDate", SingleValue(
            await ix.pool.fetchval("SELECT min(study_date) FROM study"))),), limit=5)
        with pytest.raises(QueryTooBroad, match=f"more than {STUDY_CAP} studies"):
            await search(ix.pool, on_date)
        fewer = await search(ix.pool, replace(on_date, terms=(
            *on_date.terms, Term("StudyInstanceUID", UidList(uids(3)[:1])))))
        assert len(fewer.rows) == 1

    index(scenario)


def test_an_instance_page_reads_only_the_partitions_of_its_studies(index):
    async def scenario(ix: Index) -> None:
        await load(ix, range(12))
        partitions = await ix.pool.fetchval(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'instance'::regclass")
        assert partitions > 2
        wanted = [uids(2)[0], uids(7)[0]]
        pks = [r["pk"] for r in await ix.pool.fetch(
            "SELECT pk FROM study WHERE study_uid = ANY($1) ORDER BY pk", wanted)]
        holding = {r["p"] for r in await ix.pool.fetch(
            "SELECT DISTINCT tableoid::regclass::text AS p FROM instance "
            "WHERE study_pk = ANY($1)", pks)}
        query = Query(Level.INSTANCE, (Term("StudyInstanceUID", UidList(tuple(wanted))),),
                      limit=10)
        sql, arguments = page_sql(query, pks)
        plan = "\n".join(r[0] for r in await ix.pool.fetch(f"EXPLAIN {sql}", *arguments))
        read = set(re.findall(r"\bon (instance_p\d+)", plan))
        assert read == holding, plan
        assert len(read) <= 2 < partitions
        page = await search(ix.pool, query)
        assert len(page.rows) == len(modalities_of(2)) + len(modalities_of(7)) == 3

    index(scenario)
