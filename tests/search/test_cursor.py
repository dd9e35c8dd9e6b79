"""Unit tests for the keyset cursor (`search.cursor`) and its QIDO-RS parameter: an opaque token
that round-trips the key of a page's last match at its level; anything else is a BadRequest."""

from __future__ import annotations

import base64

import pytest

from ricord_archive.errors import BadRequest
from ricord_archive.search import cursor
from ricord_archive.search.model import Level
from ricord_archive.search.qido import parse_qido


@pytest.mark.parametrize("key", [0, 1, 41, 2**40 + 3, 2**63 - 1])
@pytest.mark.parametrize("level", list(Level))
def test_a_token_round_trips_its_key_at_its_level(level, key):
    token = cursor.encode(level, key)
    assert token.isascii() and "=" not in token and "/" not in token and "+" not in token
    assert cursor.decode(token, level) == key


@pytest.mark.parametrize("token", ["", "!!!", "AAAA", "a" * 200, "AQIAAAAAAAAAKg==x",
                                   cursor.encode(Level.STUDY, 5)[:-2]])
def test_a_malformed_token_is_a_bad_request(token):
    with pytest.raises(BadRequest, match="cursor"):
        cursor.decode(token, Level.STUDY)


def test_a_token_of_another_level_or_version_is_a_bad_request():
    with pytest.raises(BadRequest, match="cursor"):
        cursor.decode(cursor.encode(Level.SERIES, 7), Level.STUDY)
    raw = base64.urlsafe_b64decode(cursor.encode(Level.STUDY, 7) + "==")
    forged = base64.urlsafe_b64encode(b"\x02" + raw[1:]).decode().rstrip("=")
    with pytest.raises(BadRequest, match="cursor"):
        cursor.decode(forged, Level.STUDY)


def test_qido_reads_the_cursor_and_refuses_it_with_an_offset():
    token = cursor.encode(Level.STUDY, 99)
    query = parse_qido(Level.STUDY, [("cursor", token), ("limit", "5")], 100)
    assert (query.after, query.offset, query.limit) == (99, 0, 5)
    assert parse_qido(Level.STUDY, [], 100).after is None
    with pytest.raises(BadRequest, match="offset and cursor"):
        parse_qido(Level.STUDY, [("cursor", token), ("offset", "0")], 100)
