"""X-Forwarded-Proto/-Host and Forwarded shape the URLs the archive hands out (STOW-RS and
QIDO-RS RetrieveURL) only when the connection comes from a trusted proxy: the real archive,
with 127.0.0.2 trusted and clients connecting from 127.0.0.2 (a proxy) or 127.0.0.1 (not)."""

from __future__ import annotations

import http.client
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from ricord_archive.config import ConfigError, load_config
from tests.conftest import Archive
from tests.web.test_auth import ct

PROXY, CLIENT = "127.0.0.2", "127.0.0.1"
ROOT = "1.2.826.0.1.3680043.10.4"


def test_trusted_proxies_are_parsed(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text('[server]\ntrusted_proxies = ["10.0.0.0/8", "127.0.0.2", "::1"]\n')
    assert [str(n) for n in load_config(path, env={}).trusted_proxies] == \
        ["10.0.0.0/8", "127.0.0.2/32", "::1/128"]


@pytest.mark.parametrize("value", ['["10.0.0.1/8"]', '["proxy.example.org"]', '"10.0.0.1"'])
def test_bad_trusted_proxies_are_rejected(tmp_path: Path, value: str):
    path = tmp_path / "c.toml"
    path.write_text(f"[server]\ntrusted_proxies = {value}\n")
    with pytest.raises(ConfigError, match="trusted_proxies"):
        load_config(path, env={})


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Iterator[Archive]:
    base = tmp_path_factory.mktemp("forwarded")
    (base / "config.toml").write_text(f'[server]\ntrusted_proxies = ["{PROXY}/32"]\n')
    archive = Archive(base / "data", base / "archive.log", base / "config.toml").start()
    yield archive
    archive.stop()


def request(archive: Archive, source: str, method: str, path: str, headers: dict[str, str],
            body: bytes | None = None) -> tuple[int, object]:
    """One request from the address `source`: (status, JSON body)."""
    connection = http.client.HTTPConnection("127.0.0.1", archive.http_port, timeout=30,
                                            source_address=(source, 0))
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def stow(archive: Archive, source: str, headers: dict[str, str], n: int) -> str:
    """Store a CT from `source`: its RetrieveURL as the STOW-RS answer gives it."""
    buffer = io.BytesIO()
    ct(f"PAT-FWD-{n}", f"{ROOT}.{n}").save_as(buffer, enforce_file_format=True)
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + buffer.getvalue() + b"\r\n--b--\r\n"
    status, answer = request(archive, source, "POST", "/dicom-web/studies", {
        **headers, "Content-Type": 'multipart/related; type="application/dicom"; boundary=b',
    }, body)
    assert status == 200
    return answer["00081199"]["Value"][0]["00081190"]["Value"][0]


def qido_urls(archive: Archive, source: str, headers: dict[str, str]) -> set[str]:
    status, answer = request(archive, source, "GET", "/dicom-web/studies",
                             {**headers, "Accept": "application/dicom+json"})
    assert status == 200 and answer
    return {document["00081190"]["Value"][0] for document in answer}


X_FORWARDED = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "archive.example.org"}
CASES = [  # headers a trusted proxy sends -> the origin of the URLs handed out
    (X_FORWARDED, "https://archive.example.org"),
    ({"Forwarded": 'for=203.0.113.9;proto=https;host="pacs.example.org:8443"'},
     "https://pacs.example.org:8443"),
    ({"Forwarded": "for=10.1.1.1;host=evil.example.org, for=203.0.113.9;host=a.example.org"},
     "http://a.example.org"),  # each proxy appends: the last is the trusted one's
    ({"X-Forwarded-Host": "evil.example.org, archive.example.org"}, "http://archive.example.org"),
    ({"X-Forwarded-Proto": "https"}, "https://127.0.0.1:{port}"),  # the Host header's
    ({"X-Forwarded-Proto": "gopher", "X-Forwarded-Host": "bad/host?x"},  # malformed: ignored
     "http://127.0.0.1:{port}"),
]


@pytest.mark.parametrize(("n", "headers", "expected"),
                         [(n, h, e) for n, (h, e) in enumerate(CASES, 1)])
def test_a_trusted_proxy_sets_the_origin(archive, n, headers, expected):
    expected = expected.format(port=archive.http_port)
    assert stow(archive, PROXY, headers, n).startswith(f"{expected}/dicom-web/studies/")
    assert all(u.startswith(f"{expected}/dicom-web/studies/")
               for u in qido_urls(archive, PROXY, headers))


@pytest.mark.parametrize("headers", [
    X_FORWARDED, {"Forwarded": 'proto=https;host="pacs.example.org:8443"'},
])
def test_an_untrusted_peer_cannot_set_the_origin(archive, headers):
    expected = f"http://127.0.0.1:{archive.http_port}/dicom-web/studies/"
    assert stow(archive, CLIENT, headers, 20 + len(headers)).startswith(expected)
    assert all(u.startswith(expected) for u in qido_urls(archive, CLIENT, headers))
