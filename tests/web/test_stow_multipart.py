"""STOW-RS bodies as real clients write them: what is unambiguous is accepted even where it
strays from RFC 2046 or PS3.18 (long boundaries, chunked bodies, header name case, `type`
quoted, unquoted or missing, LF-only part headers, transport padding); what is not stays a
400 or 415. Raw HTTP requests, so every byte on the wire is the test's."""

from __future__ import annotations

import datetime as dt
import http.client
from collections.abc import Iterator

import orjson
import pytest

from tests.conftest import Archive
from tests.phi_corpus import PhiCorpus

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
# Orthanc 1.10's boundary: two UUIDs joined by a dash, 73 characters (RFC 2046 caps at 70).
ORTHANC_BOUNDARY = "d12319d8-39d3-4963-9fb2-1689d49ae1b5-d12319d8-39d3-4963-9fb2-1689d49ae1b5"


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Iterator[Archive]:
    base = tmp_path_factory.mktemp("stow-multipart")
    archive = Archive(base / "data", base / "archive.log").start()
    yield archive
    archive.stop()


@pytest.fixture(scope="module")
def objects(tmp_path_factory) -> Iterator[bytes]:
    """A fresh DICOM object (its own study) for each request."""
    corpus = PhiCorpus(seed=20261205, out_dir=tmp_path_factory.mktemp("objects"))

    def make() -> Iterator[bytes]:
        while True:
            [path] = corpus.study(corpus.patient(), dt.date(2021, 3, 4), slices=1)
            yield path.read_bytes()

    return make()


def post(archive: Archive, content_type: str | None, body: bytes, chunked: bool = False,
         **headers: str) -> tuple[int, dict]:
    """POST /studies with exactly this body (chunked: in 1000-byte chunks)."""
    connection = http.client.HTTPConnection("127.0.0.1", archive.http_port, timeout=60)
    if content_type is not None:
        headers["Content-Type"] = content_type
    try:
        if chunked:
            pieces = [body[i:i + 1000] for i in range(0, len(body), 1000)]
            connection.request("POST", "/dicom-web/studies", body=iter(pieces),
                               headers=headers, encode_chunked=True)
        else:
            connection.request("POST", "/dicom-web/studies", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, orjson.loads(response.read() or b"{}")
    finally:
        connection.close()


def stored(answer: dict) -> int:
    return len(answer.get(REFERENCED_SOP_SEQUENCE, {}).get("Value", []))


def body_of(data: bytes, boundary: str, part_headers: str = "Content-Type: application/dicom\r\n",
            eol: str = "\r\n", padding: str = "") -> bytes:
    """One part: `eol` ends the boundary and part header lines, `padding` follows each
    boundary (transport padding)."""
    return (f"--{boundary}{padding}{eol}{part_headers.replace(chr(13) + chr(10), eol)}{eol}"
            .encode() + data + f"\r\n--{boundary}--{padding}\r\n".encode())


def test_orthancs_long_boundary_in_a_chunked_body_is_accepted(archive, objects):
    data = next(objects)
    body = body_of(data, ORTHANC_BOUNDARY,
                   f"Content-Type: application/dicom\r\nContent-Length: {len(data)}\r\n")
    status, answer = post(
        archive, f'multipart/related; type="application/dicom"; boundary={ORTHANC_BOUNDARY}',
        body, chunked=True, Accept="application/dicom+json",
    )
    assert (status, stored(answer)) == (200, 1), answer


@pytest.mark.parametrize("content_type", [
    'multipart/related; type="application/dicom"; boundary=BOUNDARY',  # as PS3.18 writes it
    "multipart/related; type=application/dicom; boundary=BOUNDARY",  # unquoted
    'Multipart/Related; Type="Application/DICOM"; Boundary="BOUNDARY"',  # case, quoting
    "multipart/related;type=application/dicom;boundary=BOUNDARY",  # no spaces
    "multipart/related; boundary=BOUNDARY",  # no type: each part says what it is
])
def test_media_type_spellings_are_accepted(archive, objects, content_type):
    status, answer = post(archive, content_type, body_of(next(objects), "BOUNDARY"))
    assert (status, stored(answer)) == (200, 1), answer


@pytest.mark.parametrize("part_headers", [
    "content-type: application/dicom\r\n",
    "CONTENT-TYPE: APPLICATION/DICOM\r\n",
    "Content-Type: application/dicom; transfer-syntax=1.2.840.10008.1.2.1\r\n",
    "",  # no Content-Type: application/dicom
])
def test_part_header_spellings_are_accepted(archive, objects, part_headers):
    body = body_of(next(objects), "BOUNDARY", part_headers)
    status, answer = post(archive, "multipart/related; type=application/dicom; boundary=BOUNDARY",
                          body)
    assert (status, stored(answer)) == (200, 1), answer


def test_lf_only_line_ends_in_part_headers_are_accepted(archive, objects):
    body = body_of(next(objects), "BOUNDARY", "Content-Type: application/dicom\r\n", eol="\n")
    assert b"\r\nContent-Type" not in body and b"\nContent-Type: application/dicom\n\n" in body
    status, answer = post(archive, "multipart/related; type=application/dicom; boundary=BOUNDARY",
                          body)
    assert (status, stored(answer)) == (200, 1), answer


def test_transport_padding_after_boundaries_is_accepted(archive, objects):
    body = body_of(next(objects), "BOUNDARY", padding=" \t ")
    assert b"--BOUNDARY \t \r\n" in body and b"--BOUNDARY-- \t \r\n" in body
    status, answer = post(archive, "multipart/related; type=application/dicom; boundary=BOUNDARY",
                          body)
    assert (status, stored(answer)) == (200, 1), answer


def test_a_preamble_and_several_parts_with_a_long_boundary(archive, objects):
    boundary = "x" * 150
    first, second = next(objects), next(objects)
    body = (b"a preamble that is not a part\r\n" + body_of(first, boundary)[:-len(boundary) - 6]
            + body_of(second, boundary))
    status, answer = post(archive, f"multipart/related; type=application/dicom; "
                                   f"boundary={boundary}", body, chunked=True)
    assert (status, stored(answer)) == (200, 2), answer


@pytest.mark.parametrize(("content_type", "body", "expected"), [
    ("multipart/related; type=application/dicom", b"--x\r\n\r\nDICM\r\n--x--\r\n", 400),
    ("multipart/related; type=application/dicom; boundary=" + "x" * 201,
     b"--" + b"x" * 201 + b"--\r\n", 400),
    ("multipart/related; type=application/dicom; boundary=nowhere", b"no boundary here", 400),
    ("multipart/related; type=application/dicom+json; boundary=x", b"--x--\r\n", 415),
    ("application/dicom", b"DICM", 415),
    (None, b"--x--\r\n", 415),
])
def test_what_stays_ambiguous_is_refused(archive, content_type, body, expected):
    status, answer = post(archive, content_type, body)
    assert status == expected, answer
    assert answer["error"]


def test_a_part_that_says_it_is_not_dicom_is_a_failed_instance(archive, objects):
    """Without a `type` parameter the parts speak for themselves."""
    body = body_of(next(objects), "B", "Content-Type: application/dicom+json\r\n")
    status, answer = post(archive, "multipart/related; boundary=B", body)
    assert status == 409
    assert len(answer[FAILED_SOP_SEQUENCE]["Value"]) == 1
