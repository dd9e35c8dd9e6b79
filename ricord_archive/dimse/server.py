"""The DIMSE adapter: C-ECHO, C-STORE, C-FIND, C-GET and C-MOVE SCP on the archive's event loop.
Thin: handlers await the services directly, so a C-STORE is acknowledged only after the index
transaction has committed.

Objects arrive for the site of their calling AE title, except during a PACS import: an
association from a calling AE title that an import session expects (in the index, shared by
every node) files the objects of the session's studies under the importing site.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from io import BytesIO

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AllStoragePresentationContexts, build_context
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from ricord_archive import audit_trail
from ricord_archive.config import Config, SiteConfig
from ricord_archive.dicom.status import (
    CANCEL,
    IDENTIFIER_MISMATCH,
    NOT_AUTHORIZED,
    OUT_OF_RESOURCES,
    PENDING,
    SUCCESS,
    UNABLE_TO_PROCESS,
)
from ricord_archive.dimse import dimse_audit, identifiers
from ricord_archive.dimse.association import Association, Handler, Rejection, Timeouts
from ricord_archive.dimse.commands import (
    C_ECHO_RQ,
    C_FIND_RQ,
    C_GET_RQ,
    C_MOVE_RQ,
    C_STORE_RQ,
    Message,
)
from ricord_archive.dimse.find_query import identifier_keys, parse_identifier
from ricord_archive.dimse.listener import start_listeners
from ricord_archive.dimse.messages import decoded, encoded, part10
from ricord_archive.dimse.retrieve import (
    GET_MODELS,
    MOVE_MODELS,
    RETRIEVE_MODELS,
    RetrieveHandlers,
)
from ricord_archive.dimse.security import AllowedAddresses
from ricord_archive.dimse.transport import PduStream, PeerGone
from ricord_archive.errors import ArchiveError, StorageUnavailable
from ricord_archive.runtime import logs, metrics
from ricord_archive.search.model import Level
from ricord_archive.services.import_sessions import ImportSessions, SessionStudy
from ricord_archive.services.ingest import IngestService
from ricord_archive.services.query import QueryService, SearchResult
from ricord_archive.services.retrieve import RetrieveService

log = logging.getLogger(__name__)

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
_PROTOCOL = "c_store"  # the protocol label of objects received here (metrics)
# A-ASSOCIATE-RJ (result, source, diagnostic): permanent, by the service user, calling AE title
# not recognised; transient, by the presentation layer, local limit exceeded
_UNKNOWN_CALLING_AET = (0x01, 0x01, 0x03)
_LOCAL_LIMIT = (0x02, 0x03, 0x02)
_NOT_FROM_ADDRESS = "calling-ae-title-not-allowed-from-address"
_NOT_RECOGNISED = "calling-ae-title-not-recognised"
_OVER_LIMIT = "local-limit-exceeded"
REJECTION_REASONS = (_NOT_FROM_ADDRESS, _NOT_RECOGNISED, _OVER_LIMIT)  # audit and metrics
STORAGE_CLASSES = [c.abstract_syntax for c in AllStoragePresentationContexts if c.abstract_syntax]


def supported_contexts() -> list[PresentationContext]:
    """What the archive accepts: storage in both roles (a C-GET requestor takes the SCP role
    to receive what it asked for), verification, query and retrieve."""
    contexts = []
    for storage in STORAGE_CLASSES:
        context = build_context(storage, TRANSFER_SYNTAXES)
        context.scu_role = context.scp_role = True
        contexts.append(context)
    for model in (Verification, StudyRootQueryRetrieveInformationModelFind,
                  PatientRootQueryRetrieveInformationModelFind, *RETRIEVE_MODELS):
        contexts.append(build_context(model))
    return contexts


class DimseServer:
    """The DIMSE listeners of one server process and the associations they accepted."""

    def __init__(
        self, config: Config, ingest: IngestService, query: QueryService,
        retrieve: RetrieveService, sessions: ImportSessions,
        trail: audit_trail.AuditTrail = audit_trail.NO_AUDIT,
    ) -> None:
        self.config = config
        self.ingest = ingest
        self.query = query
        self.sessions = sessions
        self.audit = trail
        self.contexts = supported_contexts()
        retrieve_handlers = RetrieveHandlers(config, query, retrieve, trail)
        storage = frozenset(STORAGE_CLASSES)
        finds = frozenset({StudyRootQueryRetrieveInformationModelFind,
                           PatientRootQueryRetrieveInformationModelFind})
        self.handlers: dict[int, tuple[Handler, frozenset[str]]] = {
            C_ECHO_RQ: (self._on_echo, frozenset({Verification})),
            C_STORE_RQ: (self._on_store, storage),
            C_FIND_RQ: (self._on_find, finds),
            C_GET_RQ: (retrieve_handlers.on_get, GET_MODELS),
            C_MOVE_RQ: (retrieve_handlers.on_move, MOVE_MODELS),
        }
        self._addresses = AllowedAddresses(config.sites)
        self._association_audit = dimse_audit.AssociationAudit(trail, config)
        limits = config.limits
        self._timeouts = Timeouts(limits.network_timeout, limits.acse_timeout,
                                  limits.dimse_timeout)
        self._servers: list[asyncio.Server] = []
        self._connections: dict[asyncio.Task[None], Association] = {}

    async def start(self, shared_port: bool = False) -> None:
        """Listen; with `shared_port`, alongside the archive's other server processes."""
        self._servers = await start_listeners(self.config, self._connected, shared_port)

    async def stop(self) -> None:
        """Stop accepting associations, let those in progress finish within the grace period,
        then abort what is left."""
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        tasks = set(self._connections)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self.config.limits.shutdown_grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def _connected(self, stream: PduStream, address: str, port: int) -> None:
        association = Association(stream, self, address, port, self.config.limits.max_pdu_bytes,
                                  self._timeouts)
        task = asyncio.current_task()
        assert task is not None
        logs.association_id.set(logs.new_id())  # this connection's task: its log lines
        self._connections[task] = association
        try:
            await association.run()
        except asyncio.CancelledError:
            pass  # stopping: the association was aborted
        finally:
            del self._connections[task]

    # --- association requests (the Acceptor of dimse.association) ------------------------

    async def admit(self, association: Association) -> Rejection | None:
        """None to accept; else the rejection: a site's AE title from an address it may not
        use, a calling AE title the archive does not know, or too many associations."""
        calling, peer = association.calling_aet, f"{association.address}:{association.port}"
        if not self._addresses.allows(calling, association.address):
            log.warning("association from %s rejected: calling AE title %r is not allowed from "
                        "this address", peer, calling)
            return Rejection(*_UNKNOWN_CALLING_AET, _NOT_FROM_ADDRESS)
        configured = [a for s in self.config.sites for a in s.aets]
        if not self.config.accept_any_calling_aet and calling not in configured:
            # only then do import sessions decide; else they are asked at the first C-STORE
            association.importing = calling in await self._importing_aets()
            if not association.importing:
                log.warning("association from %s rejected (calling AE title %r not recognised "
                            "or not allowed)", peer, calling)
                return Rejection(*_UNKNOWN_CALLING_AET, _NOT_RECOGNISED)
        admitted = sum(a.admitted for a in self._connections.values())
        if admitted >= self.config.limits.max_associations:
            log.warning("association from %s rejected: %d associations already (local limit)",
                        peer, admitted)
            return Rejection(*_LOCAL_LIMIT, _OVER_LIMIT)
        association.admitted = True  # counted from now on: no await since the count
        return None

    async def _importing_aets(self) -> list[str]:
        """The calling AE titles active import sessions expect objects from."""
        try:
            return await self.sessions.calling_aets()
        except Exception as exc:
            log.warning("import sessions unavailable: %s", type(exc).__name__)
            return []

    def accepted(self, association: Association) -> None:
        metrics.ASSOCIATIONS.inc()
        metrics.ASSOCIATIONS_OPEN.inc()
        self._association_audit.accepted(association)

    def rejected(self, association: Association, rejection: Rejection) -> None:
        metrics.ASSOCIATIONS_REJECTED.labels(rejection.reason.replace("-", "_")).inc()
        self._association_audit.rejected(association, rejection.reason)

    def closed(self, association: Association, how: str) -> None:
        metrics.ASSOCIATIONS_OPEN.dec()
        self._association_audit.closed(association, how)

    # --- C-ECHO, C-STORE ------------------------------------------------------------------

    async def _on_echo(self, association: Association, request: Message,
                       context: PresentationContext) -> None:
        await association.respond(request, context, SUCCESS)

    async def _on_store(self, association: Association, request: Message,
                        context: PresentationContext) -> None:
        command = request.command
        sop_class, sop_instance = (command.get("AffectedSOPClassUID", ""),
                                   command.get("AffectedSOPInstanceUID", ""))
        status = await self._store(
            association, part10(sop_class, sop_instance, context, request.dataset or b"")
        )
        await association.respond(request, context, status,
                                  AffectedSOPInstanceUID=sop_instance)

    async def _store(self, association: Association, data: bytes) -> int:
        study = await self._session_study(association, data)
        site: SiteConfig | None = (
            self.config.site_for_aet(association.calling_aet) if study is None
            else self.config.site_named(study.site_name)
        )
        if site is None:
            log.info("C-STORE refused: the calling AE title belongs to no site")
            metrics.count_ingest(_PROTOCOL, "", "refused_calling_ae_without_site")
            self.audit.record(dimse_audit.refused_without_site(association, self.config))
            return NOT_AUTHORIZED
        try:
            result = await metrics.ingesting(_PROTOCOL, site.name, self.ingest.store(
                data, site.name, by=dimse_audit.actor(association, self.config),
                protocol="C-STORE",
            ))
        except ArchiveError as exc:
            log.info("C-STORE refused: %s", exc.message)
            await self._count(study, "failed" if isinstance(exc, StorageUnavailable)
                              else "refused")
            return exc.dimse_status
        except Exception as exc:
            log.error("C-STORE failed: %s", type(exc).__name__)
            await self._count(study, "failed")
            return OUT_OF_RESOURCES
        await self._count(study, "duplicates" if result.duplicate else "stored")
        return result.warning or SUCCESS

    async def _session_study(self, association: Association, data: bytes) -> SessionStudy | None:
        """The import session expecting this object's study from its calling AE title."""
        if association.importing is None:
            association.importing = association.calling_aet in await self._importing_aets()
        if not association.importing:
            return None
        try:
            study_uid = _study_uid(data)
            study = await self.sessions.study(association.calling_aet, study_uid)
        except Exception as exc:
            log.warning("import session lookup failed: %s", type(exc).__name__)
            return None
        if study is not None and study.site_name not in self.ingest.sites:
            log.warning("an import session names site %s, unknown here", study.site_name)
            return None
        return study

    async def _count(self, study: SessionStudy | None, outcome: str) -> None:
        if study is None:
            return
        try:
            await self.sessions.count(study, outcome)
        except Exception as exc:
            log.warning("could not count an import outcome: %s", type(exc).__name__)

    # --- C-FIND ---------------------------------------------------------------------------

    async def _search(self, level: Level, identifier: Dataset) -> SearchResult:
        """A C-FIND's matches (a malformed identifier is audited as a failed query)."""
        return await self.query.search(parse_identifier(level, identifier, _QUERY_LIMIT))

    async def _on_find(self, association: Association, request: Message,
                       context: PresentationContext) -> None:
        async def respond(status: int, found: bytes | None = None) -> None:
            await association.respond(request, context, status, found)

        try:
            keys = decoded(request.dataset, context)
            level = _LEVELS.get(str(keys.get("QueryRetrieveLevel", "")).strip().upper())
            study_root = (request.command.get("AffectedSOPClassUID")
                          == StudyRootQueryRetrieveInformationModelFind)
            if level is None or (study_root and level is Level.PATIENT):
                log.info("C-FIND refused: unsupported query level for this information model")
                await respond(IDENTIFIER_MISMATCH)
                return
            result = await audit_trail.querying(
                self.audit, dimse_audit.actor(association, self.config), "C-FIND", level,
                identifier_keys(keys), self._search(level, keys),
            )
            encode = _answers(keys, context)
            answers = (encode(document) for document in result.documents)
            for answer in answers:
                if association.is_cancelled(request.command["MessageID"]):
                    await respond(CANCEL)
                    return
                await respond(PENDING, answer)
                await asyncio.sleep(0)  # read what arrived meanwhile: a C-CANCEL
        except PeerGone:
            raise
        except ArchiveError as exc:
            log.info("C-FIND refused: %s", exc.message)
            await association.respond(request, context, exc.dimse_status,
                                      ErrorComment=exc.message[:64])
            return
        except Exception as exc:
            log.error("C-FIND failed: %s", type(exc).__name__)
            await respond(UNABLE_TO_PROCESS)
            return
        await respond(SUCCESS)


def _study_uid(data: bytes) -> str:
    """The Study Instance UID of a Part 10 object (the import session it belongs to)."""
    dataset = pydicom.dcmread(BytesIO(data), stop_before_pixels=True,
                              specific_tags=["StudyInstanceUID"])
    return str(dataset.get("StudyInstanceUID", "") or "").strip()


_LEVELS = {
    "PATIENT": Level.PATIENT, "STUDY": Level.STUDY, "SERIES": Level.SERIES,
    "IMAGE": Level.INSTANCE,
}


def _answers(keys: Dataset, context: PresentationContext) -> Callable[[dict], bytes]:
    """What encodes the response identifier of each match of a request: straight from its
    DICOM JSON where `identifiers` can, else through pydicom (the reference)."""
    syntax = context.transfer_syntax[0]
    requested = [(e.tag, e.VR) for e in keys if e.keyword not in _SET_IN_RESPONSE]
    direct = (syntax.is_little_endian and not syntax.is_deflated
              and identifiers.encodable(requested))
    level = str(keys.QueryRetrieveLevel)
    wanted = [f"{element.tag:08X}" for element in keys]

    def answer(document: dict) -> bytes:
        if direct:
            fast = identifiers.identifier(requested, level, document, syntax.is_implicit_VR)
            if fast is not None:
                return fast
        found = Dataset.from_json({t: document[t] for t in wanted if t in document})
        return encoded(_response(keys, found), context)

    return answer


_SET_IN_RESPONSE = ("SpecificCharacterSet", "QueryRetrieveLevel")


def _response(identifier: Dataset, found: Dataset) -> Dataset:
    """The requested keys only, filled from the match (empty where the archive has no value)."""
    response = _requested(identifier, found)
    response.SpecificCharacterSet = identifiers.RESPONSE_CHARSET
    response.QueryRetrieveLevel = identifier.QueryRetrieveLevel
    return response


def _requested(requested: Dataset, found: Dataset) -> Dataset:
    """The attributes of `found` that `requested` names; a sequence key with an item returns
    each found item reduced to the attributes that item names (PS3.4 C.2.2.1.3)."""
    subset = Dataset()
    for element in requested:
        if element.keyword in _SET_IN_RESPONSE:
            continue
        if element.tag not in found:
            subset.add_new(element.tag, element.VR, [] if element.VR == "SQ" else None)
        elif element.VR == "SQ" and element.value and len(element.value[0]):
            items = [_requested(element.value[0], item) for item in found[element.tag].value]
            subset.add_new(element.tag, "SQ", items)
        else:
            subset.add(found[element.tag])
    return subset
