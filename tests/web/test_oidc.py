"""OpenID Connect bearer tokens: configuration, the key set (rotation, bounded refetching), and
the real archive verifying tokens against a JWKS served by a real local server, side by side
with static tokens."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import jwt
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from ricord_archive.config import ConfigError, OidcConfig, load_config
from ricord_archive.web.oidc import KeySet
from tests.conftest import Archive
from tests.jwks_server import AUDIENCE, ISSUER, JwksServer, SigningKey, claims, unsigned
from tests.web.test_auth import ct, sites_toml, stored_uids

CHALLENGE = 'Bearer realm="ricord-archive"'
ROOT = "1.2.826.0.1.3680043.10.2"
ADMIN_TOKEN = "tok-static-admin-91aa0c"
SITEIDS = {"intake": "444444", "site-a": "555555", "site-b": "666666"}


# --- configuration ------------------------------------------------------------------------

SITES = '[[sites]]\nname = "a"\n'


def load(tmp_path: Path, oidc: str, enabled: bool = True):
    path = tmp_path / "ricord-archive.toml"
    path.write_text(f"{SITES}[auth]\nenabled = {str(enabled).lower()}\n[auth.oidc]\n{oidc}")
    return load_config(path, env={})


MINIMAL = f'issuer = "{ISSUER}"\naudience = "{AUDIENCE}"\n'


def test_oidc_configuration_with_defaults(tmp_path):
    config = load(tmp_path, MINIMAL + 'jwks_url = "https://idp.example.org/certs"\n')
    assert config.auth.enabled and config.auth.tokens == ()
    assert config.auth.oidc == OidcConfig(ISSUER, (AUDIENCE,), "https://idp.example.org/certs")


def test_oidc_configuration_in_full(tmp_path):
    config = load(tmp_path, MINIMAL.replace(f'"{AUDIENCE}"', '["x", "y"]') + (
        'jwks_file = "/etc/ricord/jwks.json"\nalgorithms = ["RS256", "ES256"]\n'
        'role_claim = "realm_access.roles"\nsite_claim = "site"\nleeway = 0\n'
    ))
    assert config.auth.oidc == OidcConfig(
        ISSUER, ("x", "y"), None, Path("/etc/ricord/jwks.json"), ("RS256", "ES256"),
        "realm_access.roles", "site", 0,
    )


@pytest.mark.parametrize(("oidc", "message"), [
    ('audience = "a"\njwks_url = "https://i/k"\n', "needs issuer"),
    ('issuer = "i"\njwks_url = "https://i/k"\n', "needs audience"),
    (MINIMAL, "one of jwks_url and jwks_file"),
    (MINIMAL + 'jwks_url = "https://i/k"\njwks_file = "k.json"\n', "one of jwks_url"),
    (MINIMAL + 'jwks_url = "http://idp.example.org/k"\n', "https://"),
    (MINIMAL + 'jwks_url = "http://127.0.0.1.example.org/k"\n', "https://"),
    (MINIMAL + 'jwks_url = "https://i/k"\nalgorithms = ["HS256"]\n', "asymmetric"),
    (MINIMAL + 'jwks_url = "https://i/k"\nalgorithms = ["none"]\n', "asymmetric"),
    (MINIMAL + 'jwks_url = "https://i/k"\nalgorithms = []\n', "asymmetric"),
    (MINIMAL + 'jwks_url = "https://i/k"\nleeway = -1\n', "leeway"),
    (MINIMAL + 'jwks_url = "https://i/k"\nsecret = "x"\n', "unknown setting"),
])
def test_bad_oidc_configuration_is_rejected(tmp_path, oidc, message):
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, oidc)


# --- the key set --------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_key_set_picks_up_rotated_keys_and_bounds_refetching():
    old, new = SigningKey("old"), SigningKey("new")
    server = JwksServer(old).start()
    clock = Clock()
    keys = KeySet(OidcConfig(ISSUER, (AUDIENCE,), server.url), min_refresh=30, clock=clock)

    async def scenario() -> None:
        try:
            assert (await keys.key("old")) is not None
            assert server.fetches == 1
            server.document = {"keys": [old.jwk(), new.jwk()]}  # the issuer rotates
            assert (await keys.key("new")) is None  # within min_refresh: no refetch
            assert server.fetches == 1
            clock.now += 31
            results = await asyncio.gather(*(keys.key(f"random-{n}") for n in range(20)))
            assert results == [None] * 20
            assert server.fetches == 2  # twenty unknown kids, one refetch
            assert (await keys.key("new")) is not None
            assert (await keys.key("old")) is not None
            assert (await keys.key("random-0")) is None
            assert server.fetches == 2
            clock.now += 31
            assert (await keys.key("random-0")) is None
            assert server.fetches == 3
        finally:
            await keys.close()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()


def test_key_set_from_a_file_keeps_only_signing_keys(tmp_path):
    key = SigningKey("k1")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [
        key.jwk(), {"kty": "oct", "kid": "shared", "k": "c2VjcmV0"},
        {"kty": "RSA", "kid": "broken"}, {**SigningKey("enc").jwk(), "use": "enc"},
    ]}))
    keys = KeySet(OidcConfig(ISSUER, (AUDIENCE,), jwks_file=path))

    async def scenario() -> list[bool]:
        return [await keys.key(kid) is not None for kid in ("k1", "shared", "broken", "enc")]

    assert asyncio.run(scenario()) == [True, False, False, False]


# --- the archive --------------------------------------------------------------------------

KEY = SigningKey("k1")
OTHER = SigningKey("k1")  # same kid, another key: a forged signature
UNKNOWN = SigningKey("k-unknown")


@pytest.fixture(scope="module")
def jwks() -> JwksServer:
    server = JwksServer(KEY).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def archive(tmp_path_factory, jwks) -> Archive:
    base = tmp_path_factory.mktemp("oidc")
    (base / "config.toml").write_text(sites_toml(SITEIDS) + f"""
[auth]
enabled = true
[[auth.tokens]]
name = "static-admin"
sha256 = "{hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()}"
role = "admin"

[auth.oidc]
issuer = "{ISSUER}"
audience = ["other-app", "{AUDIENCE}"]
jwks_url = "{jwks.url}"
algorithms = ["RS256"]
role_claim = "realm_access.roles"
site_claim = "ricord_site"
leeway = 5
""")
    archive = Archive(base / "data", base / "archive.log", base / "config.toml").start()
    yield archive
    archive.stop()


def researcher() -> str:
    return KEY.sign(claims(realm_access={"roles": ["offline_access", "researcher"]}))


def uploader(site: str) -> str:
    return KEY.sign(claims(realm_access={"roles": ["uploader"]}, ricord_site=site,
                           sub=f"pacs-{site}"))


def client(archive: Archive, token: str) -> DICOMwebClient:
    return DICOMwebClient(archive.dicomweb_url, headers={"Authorization": f"Bearer {token}"})


def studies(archive: Archive, token: str) -> requests.Response:
    return requests.get(archive.dicomweb_url + "/studies", timeout=30, headers={
        "Accept": "application/dicom+json", "Authorization": f"Bearer {token}"})


@pytest.fixture(scope="module")
def stored(archive) -> dict[str, tuple[str, str, str]]:
    """site -> (study, series, instance) UIDs of one CT its OIDC uploader stored."""
    return {
        site: stored_uids(client(archive, uploader(site)), ct(f"PAT-O{n}", f"{ROOT}.{n}"))
        for n, site in enumerate(("site-a", "site-b"), 1)
    }


def test_valid_tokens_and_static_tokens_both_work(archive, stored):
    for token in (researcher(), ADMIN_TOKEN):
        response = studies(archive, token)
        assert response.status_code == 200
        seen = {d["0020000D"]["Value"][0] for d in response.json()}
        assert {s for s, _, _ in stored.values()} <= seen


def test_uploader_reads_only_its_site_and_other_sites_are_not_found(archive, stored):
    token = uploader("site-a")
    seen = {d["0020000D"]["Value"][0] for d in studies(archive, token).json()}
    assert stored["site-a"][0] in seen and stored["site-b"][0] not in seen
    for site, status in (("site-a", 200), ("site-b", 404)):
        study, series, instance = stored[site]
        response = requests.get(
            f"{archive.dicomweb_url}/studies/{study}/series/{series}/instances/{instance}"
            "/metadata", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert response.status_code == status


def test_uploader_stores_to_its_site(archive, stored):
    for site, (study, _, _) in stored.items():
        [document] = requests.get(archive.dicomweb_url + "/studies", timeout=30, params={
            "StudyInstanceUID": study, "includefield": "ClinicalTrialSiteID"},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
        assert document["00120030"]["Value"] == [SITEIDS[site]]


def _refused() -> dict[str, str]:
    roles = {"realm_access": {"roles": ["researcher"]}}
    return {
        "expired": KEY.sign(claims(**roles, exp=1_000_000_000, iat=999_999_000, nbf=None)),
        "not yet valid": KEY.sign(claims(**roles, nbf=4_000_000_000)),
        "wrong audience": KEY.sign(claims(**roles, aud="another-service")),
        "wrong issuer": KEY.sign(claims(**roles, iss="https://evil.example.org/realms/ricord")),
        "no expiry": KEY.sign(claims(**roles, exp=None)),
        "forged signature": OTHER.sign(claims(**roles)),
        "unknown kid": UNKNOWN.sign(claims(**roles)),
        "alg none": unsigned({"alg": "none", "typ": "JWT", "kid": "k1"}, claims(**roles), None),
        "HS256 with the public key": unsigned({"alg": "HS256", "typ": "JWT", "kid": "k1"},
                                              claims(**roles), KEY.public_pem()),
        "RS512 not pinned": jwt_rs512(claims(**roles)),
        "garbage": "eyJhbGciOi.not-a.jwt",
    }


def jwt_rs512(payload: dict) -> str:
    return jwt.encode(payload, KEY.private, algorithm="RS512", headers={"kid": "k1"})


REFUSED = _refused()


@pytest.mark.parametrize("case", list(REFUSED))
def test_invalid_tokens_are_401_without_echo(archive, case):
    token = REFUSED[case]
    for response in (
        studies(archive, token),
        requests.post(archive.dicomweb_url + "/studies", data=b"x", timeout=30, headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=b'}),
    ):
        assert response.status_code == 401, case
        assert response.headers["WWW-Authenticate"] == CHALLENGE
        assert token not in response.text and "alice" not in response.text
    log = archive.log()
    assert token not in log and token.split(".")[1] not in log


def test_unknown_kids_refetch_the_key_set_at_most_once(archive, jwks):
    before = jwks.fetches
    for n in range(5):
        key = SigningKey(f"attacker-{n}")
        assert studies(archive, key.sign(claims(realm_access={"roles": ["admin"]}))) \
            .status_code == 401
    assert jwks.fetches - before <= 1


@pytest.mark.parametrize("extra", [
    {"realm_access": {"roles": ["offline_access"]}},  # no archive role
    {"realm_access": {"roles": ["researcher", "admin"]}},  # two: ambiguous
    {"realm_access": {"roles": ["uploader"]}},  # an uploader without site
    {"realm_access": {"roles": ["uploader"]}, "ricord_site": "site-z"},  # unknown site
])
def test_valid_tokens_granting_no_role_are_403(archive, extra):
    assert studies(archive, KEY.sign(claims(**extra))).status_code == 403


def test_researcher_may_not_store(archive):
    with pytest.raises(requests.HTTPError) as caught:
        client(archive, researcher()).store_instances([ct("PAT-O9", f"{ROOT}.9")])
    assert caught.value.response.status_code == 403


def test_log_names_no_claims(archive, stored):
    studies(archive, researcher())
    log = archive.log()
    assert "OpenID Connect tokens of" in log
    for value in ("alice-7d1e", "pacs-site-a", "offline_access"):
        assert value not in log
