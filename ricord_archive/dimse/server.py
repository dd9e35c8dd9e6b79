"""The DIMSE adapter: C-ECHO, C-STORE and C-FIND SCP over pynetdicom. Thin.

pynetdicom runs each association in its own thread; handlers hand the work to the services on
the archive's event loop and wait for the answer, so a C-STORE is acknowledged only after the
index transaction has committed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from ricord_archive.config import Config
from ricord_archive.errors import ArchiveError
from ricord_archive.ingest import IngestService
from ricord_archive.matching import Level
from ricord_archive.query import QueryService

log = logging.getLogger(__name__)
T = TypeVar("T")

STATUS_SUCCESS = 0x0000
STATUS_PENDING = 0xFF00
STATUS_CANCEL = 0xFE00
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_UNABLE_TO_PROCESS = 0xC000
STATUS_IDENTIFIER_MISMATCH = 0xA900
_SERVICE_TIMEOUT = 300

# Stored as received: uncompressed, deflated and the common compressed transfer syntaxes.
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
]
_QUERY_LIMIT = 100_000


class DimseServer:
    def __init__(
        self, config: Config, ingest: IngestService, query: QueryService,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.config = config
        self.ingest = ingest
        self.query = query
        self.loop = loop
        self._server: ThreadedAssociationServer | None = None

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(_SERVICE_TIMEOUT)

    def start(self) -> None:
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_pdu_size = 0  # no limit on what we receive; the peer's limit still applies
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(PatientRootQueryRetrieveInformationModelFind)
        if not self.config.accept_any_calling_aet:
            ae.require_calling_aet = [a for s in self.config.sites for a in s.aets]
        handlers = [
            (evt.EVT_CONN_OPEN, _no_delay),
            (evt.EVT_REJECTED, _log_rejection),
            (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find),
        ]
        self._server = ae.start_server(
            (self.config.dimse_host, self.config.dimse_port), block=False, evt_handlers=handlers
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_store(self, event: evt.Event) -> int:
        site = self.config.site_for_aet(event.assoc.requestor.ae_title)
        if site is None:  # not reachable with require_calling_aet; kept as a guard
            return STATUS_OUT_OF_RESOURCES
        try:
            self._call(self.ingest.store(event.encoded_dataset(include_meta=True), site.name))
        except ArchiveError as exc:
            log.info("C-STORE refused: %s", exc.message)
            return exc.dimse_status
        except Exception as exc:
            log.error("C-STORE failed: %s", type(exc).__name__)
            return STATUS_OUT_OF_RESOURCES
        return STATUS_SUCCESS

    def _on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        identifier = event.identifier
        level = _LEVELS.get(str(identifier.get("QueryRetrieveLevel", "")).strip().upper())
        study_root = event.request.AffectedSOPClassUID == StudyRootQueryRetrieveInformationModelFind
        if level is None or (study_root and level is Level.PATIENT):
            log.info("C-FIND refused: unsupported query level for this information model")
            yield STATUS_IDENTIFIER_MISMATCH, None
            return
        try:
            result = self._call(
                self.query.search(level, _find_parameters(identifier), None, _QUERY_LIMIT)
            )
        except ArchiveError as exc:
            log.info("C-FIND refused: %s", exc.message)
            yield exc.dimse_status, None
            return
        except Exception as exc:
            log.error("C-FIND failed: %s", type(exc).__name__)
            yield STATUS_UNABLE_TO_PROCESS, None
            return
        for document in result.documents:
            if event.is_cancelled:
                yield STATUS_CANCEL, None
                return
            yield STATUS_PENDING, _response(identifier, Dataset.from_json(document))


_LEVELS = {
    "PATIENT": Level.PATIENT, "STUDY": Level.STUDY, "SERIES": Level.SERIES,
    "IMAGE": Level.INSTANCE,
}
_NOT_KEYS = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet", "TimezoneOffsetFromUTC"})


def _find_parameters(identifier: Dataset) -> list[tuple[str, str]]:
    """The query of a C-FIND identifier: its keys, and its return keys as includefields (an
    IMAGE-level answer then holds every requested attribute the instance has)."""
    returned = [e.keyword for e in identifier if e.keyword and e.keyword not in _NOT_KEYS]
    include = [("includefield", ",".join(returned))] if returned else []
    return [*_identifier_keys(identifier), *include]


def _identifier_keys(identifier: Dataset, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(key, value) pairs of a C-FIND identifier; sequence keys become dotted paths."""
    for element in identifier:
        if element.keyword in _NOT_KEYS or not element.keyword:
            continue
        path = f"{prefix}{element.keyword}"
        if element.VR == "SQ":
            items = element.value or []
            if items:
                yield from _identifier_keys(items[0], f"{path}.")
            else:
                yield path, ""
        else:
            yield path, _value_text(element.value)


def _value_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list):
        return "\\".join(str(v) for v in value)
    return str(value)


def _response(identifier: Dataset, found: Dataset) -> Dataset:
    """The requested keys only, filled from the match (empty where the archive has no value)."""
    response = _requested(identifier, found)
    response.SpecificCharacterSet = "ISO_IR 192"
    response.QueryRetrieveLevel = identifier.QueryRetrieveLevel
    return response


def _requested(requested: Dataset, found: Dataset) -> Dataset:
    """The attributes of `found` that `requested` names; a sequence key with an item returns
    each found item reduced to the attributes that item names (PS3.4 C.2.2.1.3)."""
    subset = Dataset()
    for element in requested:
        if element.keyword in ("SpecificCharacterSet", "QueryRetrieveLevel"):
            continue
        if element.tag not in found:
            subset.add_new(element.tag, element.VR, [] if element.VR == "SQ" else None)
        elif element.VR == "SQ" and element.value and len(element.value[0]):
            items = [_requested(element.value[0], item) for item in found[element.tag].value]
            subset.add_new(element.tag, "SQ", items)
        else:
            subset.add(found[element.tag])
    return subset


def _no_delay(event: evt.Event) -> None:
    """Nagle off: pynetdicom never sets TCP_NODELAY, and every response would wait for an ACK."""
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _log_rejection(event: evt.Event) -> None:
    log.warning(
        "association from %s:%s rejected (calling AE title %r not recognised or not allowed)",
        event.assoc.requestor.address, event.assoc.requestor.port,
        event.assoc.requestor.ae_title,
    )
