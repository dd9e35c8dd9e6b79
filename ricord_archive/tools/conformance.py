"""The generated tables of the DICOM Conformance Statement (docs/conformance-statement.md).

Each table is built from the lists the archive itself runs on (presentation contexts, transfer
syntaxes, status constants, the exception family, matching keys, the de-identification options,
the DICOMweb routes), so the statement cannot drift from the code: a test regenerates them and
compares.

    python -m ricord_archive.tools.conformance           # rewrite the tables in the document
    python -m ricord_archive.tools.conformance --check   # exit 1 when the document is stale
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from aiohttp import web
from pydicom.datadict import tag_for_keyword
from pydicom.uid import UID
from pynetdicom import (
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    AllStoragePresentationContexts,
    sop_class,
)
from pynetdicom import status as dimse_status
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import SOPClass

from ricord_archive import errors
from ricord_archive.config import Limits
from ricord_archive.deid import policy
from ricord_archive.deid.table import APPLIED_OPTIONS, DECLARED_OPTIONS
from ricord_archive.dicom import status as codes
from ricord_archive.dicom.pixels import FRAME_MEDIA_TYPES, UNCOMPRESSED
from ricord_archive.dicom.rendering import MEDIA_TYPES
from ricord_archive.dimse import client as dimse_client
from ricord_archive.dimse import retrieve as dimse_retrieve
from ricord_archive.dimse import server as dimse_server
from ricord_archive.errors import RefusedObject
from ricord_archive.search import model as matching
from ricord_archive.services import ingest
from ricord_archive.web import app as web_app

DOCUMENT = Path("docs/conformance-statement.md")
_BLOCK = re.compile(
    r"(<!-- BEGIN GENERATED (?P<name>[a-z-]+) -->\n).*?(<!-- END GENERATED (?P=name) -->)",
    re.DOTALL,
)


def _table(header: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


_KEYWORDS = {str(v): k for k, v in vars(sop_class).items() if isinstance(v, SOPClass)}


def _name(uid: str) -> str:
    """pydicom's name of a UID, else pynetdicom's keyword (newer classes), else the UID."""
    name = UID(uid).name
    return name if name and name != uid else _KEYWORDS.get(uid, uid)


def _uid(context: PresentationContext) -> str:
    assert context.abstract_syntax is not None  # every context the archive offers names one
    return context.abstract_syntax


def _storage_fate(uid: str) -> str:
    """Whether ingest keeps objects of this class: by default, when a site lists it, never."""
    try:
        policy.check_values(uid, "", policy.DEFAULT_SOP_CLASSES)
    except RefusedObject as exc:
        if exc.reason == "sop-class-not-accepted":
            return "when the site lists it"
        return f"never ({exc.reason})"
    return "by default"


def storage_sop_classes() -> str:
    storage = {c.abstract_syntax for c in AllStoragePresentationContexts}
    contexts = [c for c in dimse_server.supported_contexts() if c.abstract_syntax in storage]
    rows = [
        (_name(_uid(c)), f"`{c.abstract_syntax}`", "yes",
         "yes" if c.scp_role else "no", _storage_fate(_uid(c)))
        for c in sorted(contexts, key=lambda c: _name(_uid(c)))
    ]
    return _table(("SOP Class", "UID", "SCP (C-STORE)", "SCU (C-GET/C-MOVE sub-operations)",
                   "Stored"), rows)


def other_sop_classes() -> str:
    storage = {c.abstract_syntax for c in AllStoragePresentationContexts}
    used_as_scu = {str(v) for v in vars(dimse_client).values() if isinstance(v, SOPClass)}
    rows = [
        (_name(_uid(c)), f"`{c.abstract_syntax}`", "yes",
         "yes (`import-pacs`)" if c.abstract_syntax in used_as_scu else "no",
         ", ".join(f"`{s}`" for s in c.transfer_syntax))
        for c in dimse_server.supported_contexts() if c.abstract_syntax not in storage
    ]
    return _table(("SOP Class", "UID", "SCP", "SCU", "Transfer syntaxes accepted"), rows)


def _syntax_rows(uids: Iterable[str]) -> list[tuple[str, str]]:
    return [(_name(uid), f"`{uid}`") for uid in uids]


def accepted_transfer_syntaxes() -> str:
    return _table(("Transfer Syntax", "UID"), _syntax_rows(dimse_server.TRANSFER_SYNTAXES))


def offered_transfer_syntaxes() -> str:
    return _table(("Transfer Syntax", "UID"), _syntax_rows(UNCOMPRESSED))


def frame_media_types() -> str:
    rows = [(f"`{media}`", _name(uid), f"`{uid}`") for uid, media in FRAME_MEDIA_TYPES.items()]
    rows.append(("`application/octet-stream`", "native (uncompressed) pixel values", "—"))
    rows += [(f"`{media}`", "rendered (`/rendered`, `/thumbnail`)", "—") for media in MEDIA_TYPES]
    return _table(("Media type", "Frames of", "Transfer syntax"), rows)


def _status_meaning(code: int, tables: tuple[dict, ...]) -> tuple[str, str]:
    for table in (*tables, dimse_status.GENERAL_STATUS):
        if code in table:
            category, meaning = table[code]
            return category, meaning or "—"
    return "—", "—"


_CODES = {name: value for name, value in vars(codes).items()
          if name.isupper() and isinstance(value, int)}


def dimse_statuses() -> str:
    store = dimse_status.STORAGE_SERVICE_CLASS_STATUS
    find = dimse_status.QR_FIND_SERVICE_CLASS_STATUS
    move = dimse_status.QR_MOVE_SERVICE_CLASS_STATUS
    sources: list[tuple[str, int, str, tuple[dict, ...]]] = []
    for module, services, tables in (
        (dimse_server, "C-ECHO, C-STORE, C-FIND", (find, store)),
        (dimse_retrieve, "C-GET, C-MOVE", (move,)),
        (ingest, "C-STORE", (store,)),
    ):
        short = module.__name__.removeprefix("ricord_archive.")
        for name, value in vars(module).items():
            if _CODES.get(name) == value:  # one of the codes, imported where it is answered
                sources.append((services, value, f"`dicom.status.{name}`", tables))
            elif re.fullmatch(r"[A-Z_]+_WARNING", name) and isinstance(value, int):
                sources.append((services, value, f"`{short}.{name}`", tables))
    for error in _archive_errors():
        sources.append(("any", error.dimse_status, f"`{error.__name__}`", (store, find)))
    rows = []
    for services, code, named, cited in sorted(sources, key=lambda s: (s[1], s[2])):
        category, meaning = _status_meaning(code, cited)
        rows.append((f"`0x{code:04X}`", category, meaning, services, named))
    return _table(("Status", "Category", "Meaning", "Service", "Named in the code"), rows)


def _archive_errors() -> list[type[errors.ArchiveError]]:
    found, pending = [], [errors.ArchiveError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return sorted(found, key=lambda cls: (cls.http_status, cls.__name__))


def error_statuses() -> str:
    rows = [
        (f"`{cls.__name__}`", inspect.cleandoc(cls.__dict__.get("__doc__") or "—").split("\n")[0],
         cls.http_status, f"`0x{cls.dimse_status:04X}`", f"`0x{cls.failure_reason:04X}`")
        for cls in _archive_errors()
    ]
    return _table(("Failure", "When", "HTTP", "DIMSE status", "STOW-RS FailureReason"), rows)


def matching_keys() -> str:
    rows = []
    for key in matching.KEYS.values():
        tags = ".".join(f"{tag_for_keyword(part):08X}" for part in key.path.split("."))
        matched = key.matching.types if key.stored else (
            "universal only (removed by de-identification)")
        rows.append((key.path, f"`{tags}`", key.level.name.title(), matched))
    return _table(("Attribute", "Tag", "Level", "Matching"), rows)


def deidentification_codes() -> str:
    rows = [
        (f"`{o.code}`", "DCM", o.meaning,
         "Table E.1-1 column applied" if o in APPLIED_OPTIONS else
         "limited: Manufacturer and ManufacturerModelName kept")
        for o in DECLARED_OPTIONS
    ]
    return _table(("CodeValue", "CodingSchemeDesignator", "CodeMeaning", "How"), rows)


_TRANSACTIONS = {"stow": "STOW-RS", "qido": "QIDO-RS", "wado": "WADO-RS"}


def dicomweb_resources() -> str:
    """The DICOMweb routes of the aiohttp application."""
    app = web.Application()
    services = web_app.add_dicomweb_routes(app.router)
    rows = []
    for route in app.router.routes():
        path = route.resource.canonical if route.resource else ""
        if route.method == "HEAD" or route not in services:
            continue
        transaction = "WADO-URI" if path == "/wado" else _TRANSACTIONS[services[route]]
        rows.append((transaction, route.method, f"`{path}`"))
    return _table(("Transaction", "Method", "Resource"), rows)


def implementation() -> str:
    row = (f"`{PYNETDICOM_IMPLEMENTATION_UID}`", f"`{PYNETDICOM_IMPLEMENTATION_VERSION}`")
    return _table(("Implementation Class UID", "Implementation Version Name"), [row])


_LIMITS = {
    "max_associations": "concurrent associations accepted per server process",
    "max_pdu_bytes": "Maximum Length announced (largest P-DATA-TF PDU accepted), bytes",
    "acse_timeout": "association negotiation and release, seconds",
    "dimse_timeout": "wait for a DIMSE message, seconds",
    "network_timeout": "a silent peer is aborted after, seconds",
    "max_object_bytes": "largest object, bytes",
    "max_stow_bytes": "largest STOW-RS request body, bytes",
    "qido_max_limit": "most matches in one QIDO-RS or C-FIND answer page",
    "http_header_timeout": "an HTTP client must send its request headers within, seconds",
    "http_body_idle_timeout": "a STOW-RS body may stall for at most, seconds (then 408)",
    "http_send_timeout": "a response waits for a client that stopped reading, seconds",
}


def limits() -> str:
    defaults = Limits()
    rows = [(f"`{name}`", getattr(defaults, name), what) for name, what in _LIMITS.items()]
    return _table(("`[limits]` setting", "Default", "What it bounds"), rows)


SECTIONS: dict[str, Callable[[], str]] = {
    "implementation": implementation,
    "limits": limits,
    "storage-sop-classes": storage_sop_classes,
    "other-sop-classes": other_sop_classes,
    "accepted-transfer-syntaxes": accepted_transfer_syntaxes,
    "offered-transfer-syntaxes": offered_transfer_syntaxes,
    "frame-media-types": frame_media_types,
    "dicomweb-resources": dicomweb_resources,
    "matching-keys": matching_keys,
    "dimse-statuses": dimse_statuses,
    "error-statuses": error_statuses,
    "deidentification-codes": deidentification_codes,
}


def render(text: str) -> str:
    """`text` with every generated block filled anew (ValueError when a block is missing or
    unknown)."""
    names = [match.group("name") for match in _BLOCK.finditer(text)]
    if sorted(names) != sorted(SECTIONS):
        missing, unknown = set(SECTIONS) - set(names), set(names) - set(SECTIONS)
        raise ValueError(f"generated blocks missing {sorted(missing)}, unknown {sorted(unknown)}")
    return _BLOCK.sub(lambda m: m.group(1) + SECTIONS[m.group("name")]() + m.group(3), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("document", nargs="?", type=Path, default=DOCUMENT)
    parser.add_argument("--check", action="store_true",
                        help="only compare: exit 1 and print a diff when the document is stale")
    args = parser.parse_args(argv)
    text = args.document.read_text(encoding="utf-8")
    fresh = render(text)
    if args.check:
        if fresh != text:
            sys.stdout.writelines(difflib.unified_diff(
                text.splitlines(keepends=True), fresh.splitlines(keepends=True),
                str(args.document), "generated"))
            return 1
        return 0
    if fresh != text:
        args.document.write_text(fresh, encoding="utf-8")
        print(f"{args.document}: tables regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
