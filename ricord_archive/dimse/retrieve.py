"""C-GET and C-MOVE SCP (Patient Root and Study Root; patient, study, series and image level).

Thin: the identifier's unique keys go to the query engine, the matches to the retrieve service,
which reads each instance as stored when the peer accepted the stored transfer syntax and
re-encodes it otherwise. A C-GET sends its C-STORE sub-operations on the same association; a
C-MOVE on an association of its own with the destination (a pynetdicom SCU, in a thread).
Pending responses carry the counts, the final status lists the failed instances (0xB000, or
0xA702 when all failed); a C-CANCEL is honoured before every instance.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association as ScuAssociation
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.status import STATUS_SUCCESS as CATEGORY_SUCCESS
from pynetdicom.status import STATUS_WARNING as CATEGORY_WARNING
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from ricord_archive import audit_trail
from ricord_archive.config import Config, MoveDestination
from ricord_archive.dicom.pixels import UNCOMPRESSED
from ricord_archive.dicom.status import (
    CANCEL,
    MOVE_DESTINATION_UNKNOWN,
    OUT_OF_RESOURCES_MATCHES,
    PENDING,
    SUB_OPERATIONS_FAILED,
    SUB_OPERATIONS_WARNING,
    SUCCESS,
    UNABLE_TO_PROCESS,
)
from ricord_archive.dimse import dimse_audit
from ricord_archive.dimse.association import Association
from ricord_archive.dimse.commands import Message
from ricord_archive.dimse.messages import decoded, encoded
from ricord_archive.dimse.network import no_delay
from ricord_archive.errors import ArchiveError, BadRequest
from ricord_archive.instances import StoredInstance
from ricord_archive.search.model import Level, Query, QueryKeys
from ricord_archive.services.query import QueryService
from ricord_archive.services.retrieve import Blob, RetrieveService

log = logging.getLogger(__name__)

GET_MODELS = frozenset({
    PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelGet,
})
MOVE_MODELS = frozenset({
    PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelMove,
})
RETRIEVE_MODELS = (
    PatientRootQueryRetrieveInformationModelGet, PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelMove,
)
_PATIENT_ROOT = (
    PatientRootQueryRetrieveInformationModelGet, PatientRootQueryRetrieveInformationModelMove,
)
_MATCH_LIMIT = 65_535  # sub-operation counts are US: no retrieve can send more
_MAX_CONTEXTS = 128

_LEVELS = {
    "PATIENT": Level.PATIENT, "STUDY": Level.STUDY, "SERIES": Level.SERIES,
    "IMAGE": Level.INSTANCE,
}
# The unique key of each level, in level order (PS3.4 C.4.2.2.1: a retrieve names the unique
# keys of its level and the levels above).
_UNIQUE_KEYS = (
    (Level.PATIENT, "PatientID"), (Level.STUDY, "StudyInstanceUID"),
    (Level.SERIES, "SeriesInstanceUID"), (Level.INSTANCE, "SOPInstanceUID"),
)
_UID_TAGS = ("0020000D", "0020000E", "00080018")  # study, series, instance
Found = list[tuple[StoredInstance, Blob]]
# one C-STORE sub-operation: the status the storage SCP answered, None when it did not
SubOperation = Callable[[StoredInstance, Blob], Awaitable[int | None]]


class TooManyMatches(ArchiveError):
    """A C-GET or C-MOVE that matches more instances than one retrieve can count."""

    dimse_status = OUT_OF_RESOURCES_MATCHES


@dataclass
class SubOperations:
    """The C-STORE sub-operations of one retrieve: counts and failed instances."""

    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)

    def record(self, sop_uid: str, status: int | None) -> None:
        """One sub-operation's outcome (None: no answer, or not sent at all)."""
        self.remaining -= 1
        category = STORAGE_SERVICE_CLASS_STATUS.get(status, ("Failure",))[0] if (
            status is not None) else "Failure"
        if category == CATEGORY_SUCCESS:
            self.completed += 1
        elif category == CATEGORY_WARNING:
            self.warning += 1
        else:
            self.failed += 1
            self.failed_uids.append(sop_uid)

    def final_status(self) -> int:
        if not self.failed and not self.warning:
            return SUCCESS
        if not self.completed and not self.warning:
            return SUB_OPERATIONS_FAILED
        return SUB_OPERATIONS_WARNING


class _Responder:
    """The responses to one C-GET or C-MOVE request."""

    def __init__(self, association: Association, request: Message,
                 context: PresentationContext) -> None:
        self.association = association
        self.request = request
        self.context = context

    async def respond(self, status: int, progress: SubOperations | None = None) -> None:
        progress = progress or SubOperations(0)
        failed = None
        if status != PENDING and (progress.failed or progress.warning or status == CANCEL):
            failed = Dataset()
            failed.FailedSOPInstanceUIDList = progress.failed_uids
        await self.association.respond(
            self.request, self.context, status,
            None if failed is None else encoded(failed, self.context),
            NumberOfRemainingSuboperations=(
                progress.remaining if status in (PENDING, CANCEL) else None
            ),
            NumberOfCompletedSuboperations=progress.completed,
            NumberOfFailedSuboperations=progress.failed,
            NumberOfWarningSuboperations=progress.warning,
        )


class RetrieveHandlers:
    """The C-GET and C-MOVE request handlers."""

    def __init__(
        self, config: Config, query: QueryService, retrieve: RetrieveService,
        trail: audit_trail.AuditTrail = audit_trail.NO_AUDIT,
    ) -> None:
        self.audit = trail
        self.config = config
        self.query = query
        self.retrieve = retrieve

    async def on_get(self, association: Association, request: Message,
                     context: PresentationContext) -> None:
        responder = _Responder(association, request, context)
        found = await self._matches(request, context, "C-GET")
        self.audit.record(dimse_audit.transfer(association, self.config, "C-GET", found))
        if isinstance(found, int):
            await responder.respond(found)
            return

        async def send(item: StoredInstance, blob: Blob) -> int | None:
            return await self._store_here(association, item, blob)

        await self._sub_operations(responder, found, send)

    async def on_move(self, association: Association, request: Message,
                      context: PresentationContext) -> None:
        responder = _Responder(association, request, context)
        destination = self.config.move_destination(
            request.command.get("MoveDestination", ""), association.calling_aet
        )
        if destination is None:
            log.info("C-MOVE refused: move destination unknown")
            self.audit.record(dimse_audit.transfer(association, self.config, "C-MOVE", None))
            await responder.respond(MOVE_DESTINATION_UNKNOWN)
            return
        found = await self._matches(request, context, "C-MOVE")
        self.audit.record(dimse_audit.transfer(
            association, self.config, "C-MOVE", found, destination.aet
        ))
        if isinstance(found, int) or not found:
            await responder.respond(found if isinstance(found, int) else SUCCESS)
            return
        sub = await asyncio.to_thread(self._associate, destination, found)
        if sub is None:
            log.info("C-MOVE: no association with the move destination")
            await responder.respond(MOVE_DESTINATION_UNKNOWN)
            return

        async def send(item: StoredInstance, blob: Blob) -> int | None:
            return await self._store_there(sub, item, blob, association.calling_aet,
                                           request.command["MessageID"])

        try:
            await self._sub_operations(responder, found, send)
        finally:
            await asyncio.to_thread(_release, sub)

    async def _sub_operations(self, responder: _Responder, found: Found, send: SubOperation
                              ) -> None:
        progress = SubOperations(len(found))
        message_id = responder.request.command["MessageID"]
        for item, blob in found:
            if responder.association.is_cancelled(message_id):
                await responder.respond(CANCEL, progress)
                return
            progress.record(item.sop_uid, await send(item, blob))
            await responder.respond(PENDING, progress)
        await responder.respond(progress.final_status(), progress)

    async def _matches(self, request: Message, context: PresentationContext,
                       name: str) -> Found | int:
        """The stored instances the identifier names, or the failure status to answer."""
        try:
            return await self._resolve(decoded(request.dataset, context),
                                       request.command.get("AffectedSOPClassUID", ""))
        except ArchiveError as exc:
            log.info("%s refused: %s", name, exc.message)
            return exc.dimse_status
        except Exception as exc:  # an undecodable identifier, the index unavailable
            log.error("%s failed: %s", name, type(exc).__name__)
            return UNABLE_TO_PROCESS

    async def _resolve(self, identifier: Dataset, sop_class_uid: str) -> Found:
        """The stored instances the identifier's unique keys name, by the query engine."""
        level = _LEVELS.get(str(identifier.get("QueryRetrieveLevel", "")).strip().upper())
        patient_root = sop_class_uid in _PATIENT_ROOT
        if level is None or (level is Level.PATIENT and not patient_root):
            raise BadRequest("unsupported retrieve level for this information model")
        # PATIENT level: the patient's studies (PatientID is the pseudonym the archive gave)
        search_level = max(level, Level.STUDY)
        keys = QueryKeys(search_level)
        for key_level, keyword in _UNIQUE_KEYS:
            if key_level > level:
                break
            value = _text(identifier.get(keyword))
            if key_level is level and value in ("", "*"):
                raise BadRequest(f"a retrieve at this level needs {keyword}")
            if "*" in value or "?" in value:
                raise BadRequest(f"{keyword}: a retrieve matches single values, not wildcards")
            if value:
                keys.add(keyword, value)
        query = Query(search_level, keys.terms(), limit=_MATCH_LIMIT)
        # on the primary, like the bytes: a read replica may not have what was just stored
        result = await self.query.search(query, fresh=True)
        if result.more:
            raise TooManyMatches("too many matches for one retrieve")
        depth = search_level - Level.STUDY + 1
        scopes = [
            tuple(document[tag]["Value"][0] for tag in _UID_TAGS[:depth])
            for document in result.documents
        ]
        return await self.retrieve.in_scopes(scopes)

    async def _dataset(self, item: StoredInstance, blob: Blob,
                       accepted: Iterable[str]) -> Dataset | None:
        """The instance to send in an accepted transfer syntax; None when it cannot be."""
        try:
            return await self.retrieve.for_sending(item, blob, set(accepted))
        except ArchiveError as exc:
            log.info("instance %s not sent: %s", item.sop_uid, exc.message)
        except Exception as exc:
            log.error("instance %s not sent: %s", item.sop_uid, type(exc).__name__)
        return None

    async def _store_here(self, association: Association, item: StoredInstance,
                          blob: Blob) -> int | None:
        """A C-GET's sub-operation: a C-STORE request on the requestor's association."""
        contexts = sending_contexts(association.contexts.values(), item.sop_class_uid)
        stored = contexts.get(item.transfer_syntax_uid)
        if stored is not None:  # the stored data set as it is, unparsed
            try:
                data = data_set_bytes(await self.retrieve.stored_bytes(blob))
            except Exception as exc:
                log.error("instance %s not sent: %s", item.sop_uid, type(exc).__name__)
                return None
            if data is not None:
                return await association.send_c_store(stored, item.sop_class_uid,
                                                      item.sop_uid, data)
        dataset = await self._dataset(item, blob, contexts)
        if dataset is None:
            return None
        context = contexts.get(str(dataset.file_meta.TransferSyntaxUID))
        if context is None:
            return None
        try:
            data = await asyncio.to_thread(encoded, dataset, context)
        except Exception as exc:
            log.error("instance %s not sent: %s", item.sop_uid, type(exc).__name__)
            return None
        return await association.send_c_store(context, item.sop_class_uid, item.sop_uid, data)

    async def _store_there(self, sub: ScuAssociation, item: StoredInstance, blob: Blob,
                           originator: str, originator_id: int) -> int | None:
        """A C-MOVE's sub-operation: a C-STORE request on the association with the
        destination."""
        contexts = sending_contexts(sub.accepted_contexts, item.sop_class_uid)
        dataset = await self._dataset(item, blob, contexts)
        if dataset is None:
            return None
        try:
            status = await asyncio.to_thread(
                sub.send_c_store, dataset, originator_aet=originator, originator_id=originator_id,
            )
        except Exception as exc:
            log.error("instance %s not sent: %s", item.sop_uid, type(exc).__name__)
            return None
        return int(status.Status) if "Status" in status else None

    def _associate(self, destination: MoveDestination, found: Found) -> ScuAssociation | None:
        """An association with the move destination (blocking: pynetdicom)."""
        ae = AE(ae_title=self.config.ae_title)
        limits = self.config.limits
        ae.acse_timeout, ae.dimse_timeout = limits.acse_timeout, limits.dimse_timeout
        ae.network_timeout = limits.network_timeout
        sub = ae.associate(
            destination.host, destination.port, store_contexts(found),
            ae_title=destination.aet, evt_handlers=[(evt.EVT_CONN_OPEN, no_delay)],
        )
        return sub if sub.is_established else None


def _release(sub: ScuAssociation) -> None:
    if sub.is_established:
        sub.release()


def sending_contexts(
    contexts: Iterable[PresentationContext], sop_class_uid: str
) -> dict[str, PresentationContext]:
    """The contexts the peer accepted for us to send this SOP class in, by transfer syntax."""
    return {
        str(context.transfer_syntax[0]): context for context in contexts
        if context.abstract_syntax == sop_class_uid and context.as_scu
    }


def data_set_bytes(part10: bytes) -> bytes | None:
    """The data set of a Part 10 file as written by the archive (preamble, DICM, file meta
    starting with its group length): what follows the file meta; None for another layout."""
    if part10[128:132] != b"DICM" or part10[132:140] != b"\x02\x00\x00\x00UL\x04\x00":
        return None
    end = 144 + int.from_bytes(part10[140:144], "little")
    return part10[end:] if end <= len(part10) else None


def store_contexts(found: list[tuple[StoredInstance, Blob]]) -> list[PresentationContext]:
    """What a C-MOVE proposes to its destination: per SOP class the uncompressed syntaxes,
    and per stored transfer syntax of that class a context of its own, so the destination can
    take the stored bytes and still fall back to uncompressed (at most 128 contexts)."""
    classes = dict.fromkeys(item.sop_class_uid for item, _ in found)
    stored = dict.fromkeys(
        (item.sop_class_uid, item.transfer_syntax_uid) for item, _ in found
        if item.transfer_syntax_uid != ExplicitVRLittleEndian
    )
    contexts = [build_context(c, list(UNCOMPRESSED)) for c in classes]
    contexts += [build_context(c, [syntax]) for c, syntax in stored]
    if len(contexts) > _MAX_CONTEXTS:
        log.warning("C-MOVE: %d presentation contexts needed, %d proposed", len(contexts),
                    _MAX_CONTEXTS)
    return contexts[:_MAX_CONTEXTS]


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list):
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()
