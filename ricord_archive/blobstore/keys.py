"""Names in a blob store: keys the archive generates (never taken from input) and the names of
allocation records. Shared by every store."""

from __future__ import annotations

import re
import uuid

from ricord_archive.blobstore import segments

# a blob of its own: a file (every blob before segments) or an S3 object; `segments.KEY`: a
# segment's slot
_KEY = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{32}\.dcm$")
RECORD = re.compile(r"^(sites|patients)/[A-Za-z0-9_.-]{1,100}\.json$")
RECORDS = "records"  # the folder (prefix) of the allocation records, beside the blobs
PROBES = "probes"  # S3: where readiness probes write (and remove at once) an object


def new_key() -> str:
    """A key naming a file (or an object) of its own."""
    name = uuid.uuid4().hex
    return f"{name[:2]}/{name[2:4]}/{name}.dcm"


def check_key(key: str) -> str:
    """`key` when it is a key this archive generates; ValueError otherwise."""
    if not is_blob_key(key):
        raise ValueError("not a blob key of this archive")
    return key


def is_blob_key(key: str) -> bool:
    return bool(_KEY.fullmatch(key) or segments.KEY.fullmatch(key))


def is_file_key(key: str) -> bool:
    """Whether `key` names a blob of its own (the only kind an object store has)."""
    return bool(_KEY.fullmatch(key))


def check_file_key(key: str) -> str:
    if not is_file_key(key):
        raise ValueError("not a blob key of this archive")
    return key


def check_record(name: str) -> str:
    """`name` when it names an allocation record ('sites/...json', 'patients/...json')."""
    if not RECORD.fullmatch(name):
        raise ValueError("not an allocation record name")
    return name
