"""The DIMSE adapter: C-ECHO, C-STORE, C-FIND, C-GET and C-MOVE SCP over pynetdicom. Thin.

pynetdicom runs each association in its own thread; handlers hand the work to the services on
the archive's event loop and wait for the answer, so a C-STORE is acknowledged only after the
index transaction has committed.

Objects arrive for the site of their calling AE title, except during a PACS import: an
association from a calling AE title that an import session expects (in the index, shared by
every node) files the objects of the session's studies under the importing site.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from ricord_archive import audit
from ricord_archive.config import Config, SiteConfig
from ricord_archive.dimse import audit as dimse_audit
from ricord_archive.dimse.listener import GuardedAssociationServer, start_listeners
from ricord_archive.dimse.network import no_delay
from ricord_archive.dimse.retrieve import RETRIEVE_MODELS, RetrieveHandlers
from ricord_archive.dimse.security import AllowedAddresses
from ricord_archive.errors import ArchiveError, StorageUnavailable
from ricord_archive.imports import ImportSessions, SessionStudy
from ricord_archive.ingest import IngestService
from ricord_archive.matching import Level
from ricord_archive.query import QueryService
from ricord_archive.retrieve import RetrieveService

log = logging.getLogger(__name__)
T = TypeVar("T")

STATUS_SUCCESS = 0x0000
STATUS_PENDING = 0xFF00
STATUS_CANCEL = 0xFE00
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_NOT_AUTHORIZED = 0x0124
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


class _ArchiveAE(AE):
    """An AE whose accepted calling AE titles are read at each association request: the
    configured sites' and those of active import sessions."""

    def __init__(self, ae_title: str, calling_aets: Callable[[], list[str]]) -> None:
        super().__init__(ae_title=ae_title)
        self._calling_aets = calling_aets

    @property
    def require_calling_aet(self) -> list[str]:
        return self._calling_aets()


class DimseServer:
    def __init__(
        self, config: Config, ingest: IngestService, query: QueryService,
        retrieve: RetrieveService, sessions: ImportSessions, loop: asyncio.AbstractEventLoop,
        trail: audit.AuditTrail = audit.NO_AUDIT,
    ) -> None:
        self.config = config
        self.ingest = ingest
        self.query = query
        self.sessions = sessions
        self.loop = loop
        self.retrieve_handlers = RetrieveHandlers(config, query, retrieve, self._call)
        self._servers: list[GuardedAssociationServer] = []
        self.audit = trail
        self.retrieve_handlers = RetrieveHandlers(config, query, retrieve, self._call, trail)
        # associations from a calling AE title an import session expected when they opened
        self._importing: weakref.WeakSet[Association] = weakref.WeakSet()
        self._lock = threading.Lock()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(_SERVICE_TIMEOUT)

    def start(self, shared_port: bool = False) -> None:
        """Listen; with `shared_port`, alongside the archive's other server processes."""
        ae = _ArchiveAE(self.config.ae_title, self._calling_aets)
        limits = self.config.limits
        ae.maximum_pdu_size = limits.max_pdu_bytes
        ae.maximum_associations = limits.max_associations  # beyond: rejected, local limit
        ae.network_timeout = limits.network_timeout
        ae.acse_timeout = limits.acse_timeout
        ae.dimse_timeout = limits.dimse_timeout
        for context in AllStoragePresentationContexts:
            # both roles: a C-GET requestor takes the SCP role to receive what it asked for
            ae.add_supported_context(
                context.abstract_syntax, TRANSFER_SYNTAXES, scu_role=True, scp_role=True
            )
        ae.add_supported_context(Verification)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(PatientRootQueryRetrieveInformationModelFind)
        for model in RETRIEVE_MODELS:
            ae.add_supported_context(model)
        handlers = [
            (evt.EVT_CONN_OPEN, no_delay),
            (evt.EVT_REQUESTED, AllowedAddresses(self.config.sites).on_requested),
            (evt.EVT_REJECTED, _log_rejection),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_GET, self.retrieve_handlers.on_get),
            (evt.EVT_C_MOVE, self.retrieve_handlers.on_move),
            *dimse_audit.AssociationAudit(self.audit, self.config).handlers(),
        ]
        # the DIMSE port, and the TLS port when configured
        self._servers = start_listeners(ae, self.config, handlers, shared_port)

    def stop(self) -> None:
        """Stop accepting associations, let those in progress finish (within the grace
        period, the event loop still serving them), then abort what is left."""
        servers, self._servers = self._servers, []
        for server in servers:
            server.shutdown()
        deadline = time.monotonic() + self.config.limits.shutdown_grace
        while any(s.active_associations for s in servers) and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the association threads while they finish
        for association in (a for s in servers for a in s.active_associations):
            association.abort()

    def _calling_aets(self) -> list[str]:
        """Calling AE titles accepted now ([]: any): the sites', and while sites are
        configured, those that active import sessions expect objects from."""
        if self.config.accept_any_calling_aet:
            return []
        configured = [a for s in self.config.sites for a in s.aets]
        try:
            return configured + self._call(self.sessions.calling_aets())
        except Exception as exc:
            log.warning("import sessions unavailable: %s", type(exc).__name__)
            return configured

    def _on_accepted(self, event: evt.Event) -> None:
        try:
            importing = event.assoc.requestor.ae_title in self._call(self.sessions.calling_aets())
        except Exception as exc:
            log.warning("import sessions unavailable: %s", type(exc).__name__)
            return
        if importing:
            with self._lock:
                self._importing.add(event.assoc)

    def _session_study(self, event: evt.Event) -> SessionStudy | None:
        """The import session expecting this object's study from its calling AE title."""
        with self._lock:
            if event.assoc not in self._importing:
                return None
        try:
            study_uid = str(event.dataset.get("StudyInstanceUID", "") or "").strip()
            study = self._call(self.sessions.study(event.assoc.requestor.ae_title, study_uid))
        except Exception as exc:
            log.warning("import session lookup failed: %s", type(exc).__name__)
            return None
        if study is not None and study.site_name not in self.ingest.sites:
            log.warning("an import session names site %s, unknown here", study.site_name)
            return None
        return study

    def _count(self, study: SessionStudy | None, outcome: str) -> None:
        if study is None:
            return
        try:
            self._call(self.sessions.count(study, outcome))
        except Exception as exc:
            log.warning("could not count an import outcome: %s", type(exc).__name__)

    def _on_store(self, event: evt.Event) -> int:
        study = self._session_study(event)
        site: SiteConfig | None = (
            self.config.site_for_aet(event.assoc.requestor.ae_title) if study is None
            else self.config.site_named(study.site_name)
        )
        if site is None:
            log.info("C-STORE refused: the calling AE title belongs to no site")
            self.audit.record(dimse_audit.refused_without_site(event.assoc, self.config))
            return STATUS_NOT_AUTHORIZED
        try:
            result = self._call(audit.storing(
                self.audit, dimse_audit.actor(event.assoc, self.config), "C-STORE", site.name,
                self.ingest.store(event.encoded_dataset(include_meta=True), site.name),
            ))
        except ArchiveError as exc:
            log.info("C-STORE refused: %s", exc.message)
            self._count(study, "failed" if isinstance(exc, StorageUnavailable) else "refused")
            return exc.dimse_status
        except Exception as exc:
            log.error("C-STORE failed: %s", type(exc).__name__)
            self._count(study, "failed")
            return STATUS_OUT_OF_RESOURCES
        self._count(study, "duplicates" if result.duplicate else "stored")
        return result.warning or STATUS_SUCCESS

    def _on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        identifier = event.identifier
        level = _LEVELS.get(str(identifier.get("QueryRetrieveLevel", "")).strip().upper())
        study_root = event.request.AffectedSOPClassUID == StudyRootQueryRetrieveInformationModelFind
        if level is None or (study_root and level is Level.PATIENT):
            log.info("C-FIND refused: unsupported query level for this information model")
            yield STATUS_IDENTIFIER_MISMATCH, None
            return
        params = _find_parameters(identifier)
        try:
            result = self._call(audit.querying(
                self.audit, dimse_audit.actor(event.assoc, self.config), "C-FIND", level, params,
                self.query.search(level, params, None, _QUERY_LIMIT),
            ))
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


def _log_rejection(event: evt.Event) -> None:
    log.warning(
        "association from %s:%s rejected (calling AE title %r not recognised or not allowed)",
        event.assoc.requestor.address, event.assoc.requestor.port,
        event.assoc.requestor.ae_title,
    )
