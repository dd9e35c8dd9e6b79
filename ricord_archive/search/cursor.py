"""The keyset cursor of a search: an opaque token naming where the next page starts. Pure.

A token carries the query level and the key (index primary key) of the last match of the page
it continues; clients must treat it as opaque and only pass back what a `Link: rel="next"`
gave them. The key is no identifier of a patient or study, only a position in the archive's
stable order.
"""

from __future__ import annotations

import base64
import binascii
import struct

from ricord_archive.errors import BadRequest
from ricord_archive.search.model import Level

_VERSION = 1
_LAYOUT = struct.Struct(">BBQ")  # version, level, key


def encode(level: Level, key: int) -> str:
    """The token of the page that follows the match with key `key`."""
    raw = _LAYOUT.pack(_VERSION, int(level), key)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode(token: str, level: Level) -> int:
    """The key a token continues after; BadRequest when it is not one this archive issued for
    a search at `level`."""
    try:
        raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
        version, token_level, key = _LAYOUT.unpack(raw)
    except (binascii.Error, struct.error, ValueError) as exc:
        raise BadRequest("cursor: malformed; pass back the cursor of a Link header unchanged")\
            from exc
    if (version != _VERSION or token_level != int(level) or key > 2**63 - 1
            or encode(level, key) != token):
        raise BadRequest("cursor: not a cursor of a search at this level; "
                         "pass back the cursor of a Link header unchanged")
    return key
