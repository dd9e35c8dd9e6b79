"""DICOMweb authentication and authorization with static bearer tokens: configuration, the
token check, and the role x site x endpoint matrix against a real server."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pydicom
import pytest
import requests
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file

from ricord_archive.config import ApiToken, ConfigError, load_config
from ricord_archive.web import access
from ricord_archive.web import auth as web_auth
from ricord_archive.web.auth import Authenticator, Principal
from tests.conftest import Archive

TOKENS = {  # name -> token in clear (the archive only ever sees their hashes)
    "upload-a": "tok-upload-a-3f9c2b",
    "upload-b": "tok-upload-b-81d0aa",
    "research": "tok-research-5e77c1",
    "admin": "tok-admin-0b12fe",
}
ROOT = "1.2.826.0.1.3680043.10.1"  # of the test objects' original UIDs
SITEIDS = {"site-a": "111111", "site-b": "222222", "intake": "333333"}


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def sites_toml(siteids: dict[str, str]) -> str:
    """Three sites (intake the default) with pinned SITEIDs."""
    return "".join(
        f'[[sites]]\nname = "{name}"\nsiteid = "{siteids[name]}"\n'
        + ("default = true\n" if name == "intake" else "") + "\n"
        for name in ("intake", "site-a", "site-b")
    )


CONFIG = sites_toml(SITEIDS) + f"""
[auth]
enabled = true

[[auth.tokens]]
name = "upload-a"
sha256 = "{sha(TOKENS['upload-a'])}"
role = "uploader"
site = "site-a"

[[auth.tokens]]
name = "upload-b"
sha256 = "{sha(TOKENS['upload-b']).upper()}"
role = "uploader"
site = "site-b"

[[auth.tokens]]
name = "research"
sha256 = "{sha(TOKENS['research'])}"
role = "researcher"

[[auth.tokens]]
name = "admin"
sha256 = "{sha(TOKENS['admin'])}"
role = "admin"
"""

# --- configuration ------------------------------------------------------------------------

SITES = '[[sites]]\nname = "a"\n[[sites]]\nname = "b"\n'


def load(tmp_path: Path, text: str):
    path = tmp_path / "ricord-archive.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, env={})


def token_toml(**entry: str) -> str:
    return "[[auth.tokens]]\n" + "".join(f'{k} = "{v}"\n' for k, v in entry.items())


def test_auth_is_off_by_default(tmp_path):
    config = load(tmp_path, SITES)
    assert not config.auth.enabled and config.auth.tokens == ()


def test_tokens_are_parsed_with_lowercase_hashes(tmp_path):
    config = load(tmp_path, SITES + "[auth]\nenabled = true\n" + token_toml(
        name="up", sha256="AB" * 32, role="uploader", site="b",
    ) + token_toml(name="res", sha256="cd" * 32, role="researcher"))
    assert config.auth.enabled
    assert config.auth.tokens == (
        ApiToken("up", "ab" * 32, "uploader", "b"), ApiToken("res", "cd" * 32, "researcher"),
    )


@pytest.mark.parametrize(("auth", "message"), [
    ("[auth]\nenabled = \"yes\"\n", "enabled must be true or false"),
    ("[auth]\nenabled = true\n", "neither \\[\\[auth.tokens\\]\\] nor"),
    ("[auth]\nsecret = 1\n", "unknown setting"),
    (token_toml(sha256="ab" * 32, role="admin"), "needs a name"),
    (token_toml(name="t", sha256="secret-token", role="admin"), "64 hexadecimal"),
    (token_toml(name="t", sha256="ab" * 32, role="root"), "role must be one of"),
    (token_toml(name="t", sha256="ab" * 32, role="uploader"), "needs site"),
    (token_toml(name="t", sha256="ab" * 32, role="uploader", site="zz"), "needs site"),
    (token_toml(name="t", sha256="ab" * 32, role="admin", site="a"), "only an uploader"),
    (token_toml(name="t", sha256="ab" * 32, role="admin", token="x"), "unknown setting"),
    (token_toml(name="t", sha256="ab" * 32, role="admin")
     + token_toml(name="t", sha256="cd" * 32, role="admin"), "names must be unique"),
    (token_toml(name="t", sha256="ab" * 32, role="admin")
     + token_toml(name="u", sha256="AB" * 32, role="admin"), "same sha256"),
])
def test_bad_auth_configuration_is_rejected(tmp_path, auth, message):
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, SITES + auth)


def test_authenticator_matches_by_hash_only():
    authenticator = Authenticator(
        [ApiToken("up", sha("s3cret"), "uploader", "a"), ApiToken("adm", sha("root"), "admin")],
        {"a": 7},
    )
    assert authenticator.principal("Bearer s3cret") == Principal("up", "uploader", "a", 7)
    assert authenticator.principal("bearer  root") == Principal("adm", "admin")
    for header in (None, "", "Bearer", "Bearer other", "Basic s3cret", sha("s3cret"),
                   f"Bearer {sha('s3cret')}"):
        assert authenticator.principal(header) is None


# --- the server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Archive:
    base = tmp_path_factory.mktemp("auth")
    (base / "config.toml").write_text(CONFIG)
    archive = Archive(base / "data", base / "archive.log", base / "config.toml").start()
    yield archive
    archive.stop()


def client(archive: Archive, name: str) -> DICOMwebClient:
    return DICOMwebClient(archive.dicomweb_url,
                          headers={"Authorization": f"Bearer {TOKENS[name]}"})


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


def ct(patient_id: str, uid_root: str) -> pydicom.Dataset:
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    dataset.PatientID = patient_id
    dataset.StudyInstanceUID = f"{uid_root}.1"
    dataset.SeriesInstanceUID = f"{uid_root}.2"
    dataset.SOPInstanceUID = f"{uid_root}.3"
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    return dataset


def stored_uids(client: DICOMwebClient, dataset: pydicom.Dataset) -> tuple[str, str, str]:
    """The (study, series, instance) UIDs the archive gave the stored object."""
    [item] = client.store_instances([dataset]).ReferencedSOPSequence
    parts = item.RetrieveURL.split("/dicom-web/")[1].split("/")
    return parts[1], parts[3], parts[5]


@pytest.fixture(scope="module")
def stored(archive) -> dict[str, tuple[str, str, str]]:
    """site -> (study, series, instance) UIDs of one CT stored by that site's uploader."""
    return {
        site: stored_uids(client(archive, f"upload-{site[-1]}"), ct(f"PAT-{n}", f"{ROOT}.{n}"))
        for n, site in enumerate(("site-a", "site-b"), 1)
    }


def read_paths(uids: tuple[str, str, str]) -> dict[str, tuple[str, dict[str, str]]]:
    """Every read resource of one stored instance: name -> (path and query, Accept)."""
    study, series, instance = uids
    s, se, i = f"/studies/{study}", f"/studies/{study}/series/{series}", \
        f"/studies/{study}/series/{series}/instances/{instance}"
    dicom = "multipart/related; type=application/dicom"
    octet = "multipart/related; type=application/octet-stream"
    return {
        "retrieve-study": (s, dicom), "retrieve-series": (se, dicom),
        "retrieve-instance": (i, dicom),
        "metadata-study": (f"{s}/metadata", "application/dicom+json"),
        "metadata-series": (f"{se}/metadata", "application/dicom+json"),
        "metadata-instance": (f"{i}/metadata", "application/dicom+json"),
        "thumbnail-study": (f"{s}/thumbnail", "image/jpeg"),
        "thumbnail-instance": (f"{i}/thumbnail", "image/jpeg"),
        "rendered": (f"{i}/rendered", "image/jpeg"),
        "frames": (f"{i}/frames/1", octet),
        "frame-rendered": (f"{i}/frames/1/rendered", "image/png"),
        "bulkdata": (f"{i}/bulkdata/7FE00010", octet),
        "wado-uri": (f"/../wado?requestType=WADO&studyUID={study}&seriesUID={series}"
                     f"&objectUID={instance}&contentType=application/dicom", "*/*"),
    }


READS = list(read_paths(("1", "2", "3")))
QIDO = ["/studies", "/series", "/instances"]


def get(archive: Archive, path: str, accept: str, name: str | None) -> requests.Response:
    url = (archive.root + path[3:]) if path.startswith("/../") else archive.dicomweb_url + path
    headers = {"Accept": accept, **(bearer(name) if name else {})}
    return requests.get(url, headers=headers, timeout=30)


def qido(archive: Archive, path: str, name: str, **params: str) -> list[dict]:
    response = requests.get(archive.dicomweb_url + path, params=params,
                            headers={"Accept": "application/dicom+json", **bearer(name)},
                            timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def instances_seen(archive: Archive, name: str) -> int:
    """How many instances `name` finds, study by study (an instance search names its studies)."""
    return sum(len(qido(archive, f"/studies/{d['0020000D']['Value'][0]}/instances", name))
               for d in qido(archive, "/studies", name))


def studies_seen(archive: Archive, name: str, stored) -> set[str]:
    uids = {d["0020000D"]["Value"][0] for d in qido(archive, "/studies", name)}
    return {site for site, (study, _, _) in stored.items() if study in uids}


@pytest.mark.parametrize("endpoint", READS)
@pytest.mark.parametrize("header", [None, "Bearer not-a-token", f"Basic {TOKENS['admin']}",
                                    f"Bearer {sha(TOKENS['admin'])}"])
def test_reads_need_a_known_token(archive, stored, endpoint, header):
    path, accept = read_paths(stored["site-a"])[endpoint]
    url = (archive.root + path[3:]) if path.startswith("/../") else archive.dicomweb_url + path
    headers = {"Accept": accept, **({"Authorization": header} if header else {})}
    response = requests.get(url, headers=headers, timeout=30)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="ricord-archive"'


@pytest.mark.parametrize("path", [*QIDO, "/studies/1.2.3/series"])
def test_qido_needs_a_token(archive, path):
    response = requests.get(archive.dicomweb_url + path, timeout=30)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="ricord-archive"'


def test_stow_without_a_token_is_401_and_stores_nothing(archive, stored):
    before = instances_seen(archive, "admin")
    with pytest.raises(requests.HTTPError) as caught:
        archive.client().store_instances([ct("PAT-X", f"{ROOT}.9")])
    assert caught.value.response.status_code == 401
    assert caught.value.response.headers["WWW-Authenticate"] == 'Bearer realm="ricord-archive"'
    assert instances_seen(archive, "admin") == before


def test_researcher_may_not_store(archive, stored):
    with pytest.raises(requests.HTTPError) as caught:
        client(archive, "research").store_instances([ct("PAT-R", f"{ROOT}.8")])
    assert caught.value.response.status_code == 403


def test_uploads_go_to_the_uploaders_site(archive, stored):
    for site, (study, _, _) in stored.items():
        [document] = qido(archive, "/studies", "admin", StudyInstanceUID=study,
                          includefield="ClinicalTrialSiteID")
        assert document["00120030"]["Value"] == [SITEIDS[site]]
        assert qido(archive, "/studies", "admin", StudyInstanceUID=study,
                    ClinicalTrialSiteID=SITEIDS[site])


def test_admin_uploads_go_to_the_default_site(archive, stored):
    study, _, _ = stored_uids(client(archive, "admin"), ct("PAT-C", f"{ROOT}.3"))
    [document] = qido(archive, "/studies", "admin", StudyInstanceUID=study,
                      includefield="ClinicalTrialSiteID")
    assert document["00120030"]["Value"] == [SITEIDS["intake"]]


@pytest.mark.parametrize(("name", "sites"), [
    ("upload-a", {"site-a"}), ("upload-b", {"site-b"}),
    ("research", {"site-a", "site-b"}), ("admin", {"site-a", "site-b"}),
])
def test_qido_shows_what_the_role_may_see(archive, stored, name, sites):
    assert studies_seen(archive, name, stored) == sites
    every_study = ",".join(s for s, _, _ in stored.values())  # an instance search names them
    for path, params in (("/series", {}), ("/instances", {"StudyInstanceUID": every_study})):
        studies = {d["0020000D"]["Value"][0] for d in qido(archive, path, name, **params)}
        assert studies & {s for s, _, _ in stored.values()} == {stored[s][0] for s in sites}
    for site in {"site-a", "site-b"} - sites:  # not even by its UID, nor below it
        study = stored[site][0]
        assert qido(archive, "/studies", name, StudyInstanceUID=study) == []
        assert qido(archive, f"/studies/{study}/series", name) == []
        assert qido(archive, f"/studies/{study}/instances", name) == []


@pytest.mark.parametrize("endpoint", READS)
@pytest.mark.parametrize(("name", "site", "status"), [
    ("upload-a", "site-a", 200), ("upload-a", "site-b", 404),
    ("upload-b", "site-b", 200), ("upload-b", "site-a", 404),
    ("research", "site-a", 200), ("research", "site-b", 200),
    ("admin", "site-a", 200), ("admin", "site-b", 200),
])
def test_wado_matrix(archive, stored, endpoint, name, site, status):
    path, accept = read_paths(stored[site])[endpoint]
    response = get(archive, path, accept, name)
    assert response.status_code == status, response.text[:200]


def test_cors_preflight_health_ready_and_metrics_need_no_token(archive):
    preflight = requests.options(archive.dicomweb_url + "/studies", headers={
        "Origin": "http://viewer.example.org", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "Authorization",
    }, timeout=30)
    assert preflight.status_code == 204
    for path in ("/health", "/ready", "/metrics"):  # operations: no PHI, no UIDs
        assert requests.get(archive.root + path, timeout=30).status_code == 200


def test_refusals_carry_cors_headers(archive):
    response = requests.get(archive.dicomweb_url + "/studies",
                            headers={"Origin": "http://viewer.example.org"}, timeout=30)
    assert response.status_code == 401
    assert response.headers["Access-Control-Allow-Origin"] == "*"


def test_log_names_tokens_never_shows_them(archive, stored):
    with pytest.raises(requests.HTTPError):
        client(archive, "research").store_instances([ct("PAT-L", f"{ROOT}.7")])
    log = archive.log()
    assert "AUTHENTICATION ENABLED" in log
    assert "token research" in log
    for token in TOKENS.values():
        assert token not in log and sha(token) not in log


def test_an_api_route_without_an_access_rule_is_refused():
    """/api routes fail closed: one whose handler declares no roles (`access.allow`) answers
    403 to every token, admin included; a declared one lets its roles in; an unknown /api path
    stays 404. A real aiohttp server on loopback, driven by a real HTTP client."""
    admin = ApiToken("admin", hashlib.sha256(b"tok-admin").hexdigest(), "admin")
    research = ApiToken("research", hashlib.sha256(b"tok-research").hexdigest(), "researcher")

    async def forgotten(request: web.Request) -> web.Response:
        return web.Response(text="open")

    @access.allow("admin")
    async def declared(request: web.Request) -> web.Response:
        return web.Response(text="admin only")

    async def exchange() -> list[tuple[str, str, int]]:
        app = web.Application(middlewares=[
            web_auth.middleware(Authenticator([admin, research], {}))])
        app.router.add_get("/api/forgotten", forgotten)
        app.router.add_get("/api/declared", declared)
        answers = []
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            for path in ("/api/forgotten", "/api/declared", "/api/nowhere"):
                for token in ("tok-admin", "tok-research"):
                    response = await client.get(
                        path, headers={"Authorization": f"Bearer {token}"})
                    answers.append((path, token, response.status))
        return answers

    assert asyncio.run(exchange()) == [
        ("/api/forgotten", "tok-admin", 403), ("/api/forgotten", "tok-research", 403),
        ("/api/declared", "tok-admin", 200), ("/api/declared", "tok-research", 403),
        ("/api/nowhere", "tok-admin", 404), ("/api/nowhere", "tok-research", 404),
    ]
