"""QIDO-RS keyset paging and instance searches over real HTTP (issue #18): the `Link: rel="next"`
header (RFC 8288) walks every match once in order, also while studies arrive between pages; the
cursor keeps the request's filters; a malformed cursor, a cursor of another level and offset
with a cursor are 400; an instance search that names no studies is 400 saying how to narrow it.
One archive per module, loaded over STOW-RS with dicomweb-client."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator

import pydicom
import pytest
import requests

from tests.conftest import Archive, _stop_leftover_postgres, every_instance
from tests.phi_corpus import PhiCorpus

pytestmark = pytest.mark.slow

STUDY_UID, SOP_UID, MODALITY, MODALITIES = "0020000D", "00080018", "00080060", "00080061"
PATIENT_ID = "00100020"
STUDIES = 7


def store_study(archive: Archive, corpus: PhiCorpus, n: int, modality: str) -> None:
    day = dt.date(2021, 1, 1) + dt.timedelta(days=n)
    files = corpus.study(corpus.patient(), day, slices=2, modality=modality)
    archive.client().store_instances([pydicom.dcmread(f) for f in files])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> PhiCorpus:
    return PhiCorpus(seed=1818, out_dir=tmp_path_factory.mktemp("paging-corpus"))


@pytest.fixture(scope="module")
def archive(tmp_path_factory, corpus) -> Iterator[Archive]:
    base = tmp_path_factory.mktemp("paging")
    running = Archive(base / "data", base / "archive.log")
    try:
        running.start()
        for n in range(STUDIES):
            store_study(running, corpus, n, "MR" if n % 3 == 0 else "CT")
        yield running
    finally:
        running.stop()
        _stop_leftover_postgres(running.data_dir)


def get(url: str, params=None, **headers: str) -> requests.Response:
    return requests.get(url, params=params, headers=headers, timeout=30)


def next_link(response: requests.Response) -> str | None:
    """The target of the response's Link rel="next", None when it has none."""
    match = re.fullmatch(r'<([^>]*)>; rel="next"', response.headers.get("Link", ""))
    return match.group(1) if match else None


def uids(documents: list[dict], tag: str = STUDY_UID) -> list[str]:
    return [d[tag]["Value"][0] for d in documents]


def walk(first: str, params=None, on_page=None) -> tuple[list[dict], list[str]]:
    """Every page from `first` by its Link headers: the matches, and the URLs followed."""
    found, urls = [], []
    response = get(first, params)
    while True:
        assert response.status_code == 200, response.text
        found += response.json()
        url = next_link(response)
        if url is None:
            assert "more matches" not in response.headers.get("Warning", "")
            return found, urls
        assert "more matches" in response.headers["Warning"]
        urls.append(url)
        if on_page:
            on_page()
        response = get(url)


def test_link_headers_walk_every_study_once_in_order(archive):
    everything = uids(get(f"{archive.dicomweb_url}/studies").json())
    assert len(everything) >= STUDIES
    found, urls = walk(f"{archive.dicomweb_url}/studies", {"limit": "2", "includefield": "all"})
    assert uids(found) == everything
    assert len(urls) == (len(everything) - 1) // 2
    for url in urls:  # the same request, its offset replaced by a cursor
        assert url.startswith(f"{archive.dicomweb_url}/studies?")
        assert "limit=2" in url and "includefield=all" in url and "cursor=" in url
        assert "offset" not in url


def test_studies_arriving_between_pages_are_found_once_at_the_end(archive, corpus):
    before = uids(get(f"{archive.dicomweb_url}/studies").json())
    arrived = []

    def one_more() -> None:
        if len(arrived) < 2:
            store_study(archive, corpus, 50 + len(arrived), "CT")
            arrived.append(1)

    found, _ = walk(f"{archive.dicomweb_url}/studies", {"limit": "3"}, on_page=one_more)
    after = uids(get(f"{archive.dicomweb_url}/studies").json())
    assert len(after) == len(before) + 2
    assert uids(found) == after  # each once, the new ones last (the key order)


def test_a_cursor_keeps_the_request_s_filters(archive):
    url = f"{archive.dicomweb_url}/studies"
    expected = uids(get(url, {"ModalitiesInStudy": "MR"}).json())
    assert len(expected) >= 3
    found, urls = walk(url, {"ModalitiesInStudy": "MR", "limit": "1"})
    assert uids(found) == expected
    assert all("ModalitiesInStudy=MR" in u for u in urls)
    assert all(MODALITIES in d and "MR" in d[MODALITIES]["Value"] for d in found)


def test_instances_of_a_study_page_by_cursor_too(archive):
    study = uids(get(f"{archive.dicomweb_url}/studies", {"limit": "1"}).json())[0]
    url = f"{archive.dicomweb_url}/studies/{study}/instances"
    expected = uids(get(url).json(), SOP_UID)
    found, urls = walk(url, {"limit": "1"})
    assert uids(found, SOP_UID) == expected and len(urls) == len(expected) - 1


def test_offset_still_pages_and_its_link_continues_after_the_page(archive):
    url = f"{archive.dicomweb_url}/studies"
    everything = uids(get(url).json())
    response = get(url, {"limit": "2", "offset": "1"})
    assert uids(response.json()) == everything[1:3]
    rest, _ = walk(next_link(response) or "")
    assert uids(rest) == everything[3:]


@pytest.mark.parametrize(("params", "named"), [
    ({"cursor": "not a cursor!"}, "cursor"),
    ({"cursor": "AAAA"}, "cursor"),
    ({"cursor": ""}, "cursor"),
])
def test_a_malformed_cursor_is_400(archive, params, named):
    response = get(f"{archive.dicomweb_url}/studies", params)
    assert response.status_code == 400
    assert named in response.json()["error"]


def test_a_cursor_of_another_level_and_offset_with_a_cursor_are_400(archive):
    first = get(f"{archive.dicomweb_url}/series", {"limit": "1"})
    token = re.search(r"cursor=([^&>]+)", first.headers["Link"]).group(1)
    other_level = get(f"{archive.dicomweb_url}/studies", {"cursor": token})
    assert other_level.status_code == 400 and "cursor" in other_level.json()["error"]
    both = get(f"{archive.dicomweb_url}/series", {"cursor": token, "offset": "2"})
    assert both.status_code == 400
    assert "offset and cursor" in both.json()["error"]


def test_cors_exposes_the_link_header(archive):
    response = get(f"{archive.dicomweb_url}/studies", {"limit": "1"},
                   Origin="https://viewer.example.org")
    assert response.headers["Link"]
    assert "link" in response.headers["Access-Control-Expose-Headers"].lower().split(", ")


# --- instance searches name their studies ----------------------------------------------------

@pytest.mark.parametrize("params", [{}, {"Modality": "CT"}, {"InstanceNumber": "1"},
                                    {"PatientID": "*"}, {"limit": "100"}])
def test_an_instance_search_naming_no_studies_is_400_saying_how_to_narrow_it(archive, params):
    response = get(f"{archive.dicomweb_url}/instances", params)
    assert response.status_code == 400
    message = response.json()["error"]
    assert "instance search too broad" in message
    assert "StudyInstanceUID" in message and "PatientID" in message


def test_instance_searches_narrowed_by_each_kind_of_term(archive):
    client = archive.client()
    instances = every_instance(client)
    some = instances[3]
    study, series, sop = (some[t]["Value"][0] for t in (STUDY_UID, "0020000E", SOP_UID))
    in_study = [i for i in instances if i[STUDY_UID]["Value"][0] == study]
    url = f"{archive.dicomweb_url}/instances"
    assert uids(get(url, {"StudyInstanceUID": study}).json(), SOP_UID) == uids(in_study, SOP_UID)
    assert uids(get(url, {"SeriesInstanceUID": series}).json(), SOP_UID) == uids(
        [i for i in instances if i["0020000E"]["Value"][0] == series], SOP_UID)
    assert uids(get(url, {"SOPInstanceUID": sop}).json(), SOP_UID) == [sop]
    patient = some[PATIENT_ID]["Value"][0]
    assert uids(get(url, {"PatientID": patient}).json(), SOP_UID) == uids(
        [i for i in instances if i[PATIENT_ID]["Value"][0] == patient], SOP_UID)
    assert uids(client.search_for_instances(study), SOP_UID) == uids(in_study, SOP_UID)
    by_modality = get(url, {"ModalitiesInStudy": "MR", "limit": "1000"}).json()
    assert {d[MODALITY]["Value"][0] for d in by_modality} == {"MR"}
