"""The one UID check for input (request paths, query values, sheets, label exports): digits
and dots, at most 64 characters (PS3.5 9.1). Components with a leading zero, which some
senders write, are accepted: such a UID is looked up, never generated."""

from __future__ import annotations

import re

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
MAX_LENGTH = 64


def is_uid(text: str) -> bool:
    return len(text) <= MAX_LENGTH and _UID.fullmatch(text) is not None
