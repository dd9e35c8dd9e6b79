"""C-GET and C-MOVE SCP (Patient Root and Study Root; patient, study, series and image level).

Thin: the identifier's unique keys go to the query engine, the matches to the retrieve service,
which reads each instance as stored when the peer accepted the stored transfer syntax and
re-encodes it otherwise. pynetdicom sends the C-STORE sub-operations, the pending responses
with their counts, and the final status (0xB000 with FailedSOPInstanceUIDList when some
sub-operations failed); C-CANCEL is checked before every instance.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from ricord_archive import audit
from ricord_archive.config import Config
from ricord_archive.dimse import audit as dimse_audit
from ricord_archive.dimse.network import no_delay
from ricord_archive.errors import ArchiveError, BadRequest
from ricord_archive.index.reads import StoredInstance
from ricord_archive.matching import Level
from ricord_archive.pixels import UNCOMPRESSED
from ricord_archive.query import QueryService
from ricord_archive.retrieve import Blob, RetrieveService

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRIEVE_MODELS = (
    PatientRootQueryRetrieveInformationModelGet, PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelMove,
)
_PATIENT_ROOT = (
    PatientRootQueryRetrieveInformationModelGet, PatientRootQueryRetrieveInformationModelMove,
)
STATUS_PENDING = 0xFF00
STATUS_CANCEL = 0xFE00
STATUS_UNABLE_TO_PROCESS = 0xC000
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


class TooManyMatches(ArchiveError):
    dimse_status = 0xA701  # Refused: out of resources, unable to calculate number of matches


class RetrieveHandlers:
    """EVT_C_GET and EVT_C_MOVE handlers; `call` runs a service coroutine on the archive's
    event loop and waits for it (handlers run in pynetdicom's association threads)."""

    def __init__(
        self, config: Config, query: QueryService, retrieve: RetrieveService,
        call: Callable[[Coroutine[Any, Any, Any]], Any],
        trail: audit.AuditTrail = audit.NO_AUDIT,
    ) -> None:
        self.audit = trail
        self.config = config
        self.query = query
        self.retrieve = retrieve
        self._call = call

    def on_get(self, event: evt.Event) -> Iterator[Any]:
        found = self._matches(event, "C-GET")
        self.audit.record(dimse_audit.transfer(event.assoc, self.config, "C-GET", found))
        if isinstance(found, int):
            yield 1  # pynetdicom answers a failure only after a count of sub-operations
            yield found, None
            return
        yield len(found)
        yield from self._sub_operations(event, found, lambda: event.assoc)

    def on_move(self, event: evt.Event) -> Iterator[Any]:
        destination = self.config.move_destination(
            event.move_destination or "", event.assoc.requestor.ae_title
        )
        if destination is None:
            log.info("C-MOVE refused: move destination unknown")
            self.audit.record(dimse_audit.transfer(event.assoc, self.config, "C-MOVE", None))
            yield None, None  # pynetdicom answers 0xA801 Move Destination unknown
            return
        found = self._matches(event, "C-MOVE")
        self.audit.record(dimse_audit.transfer(
            event.assoc, self.config, "C-MOVE", found, destination.aet
        ))
        if isinstance(found, int):
            # pynetdicom answers a failure only after associating with the destination
            yield destination.host, destination.port, {"contexts": [build_context(Verification)]}
            yield 1
            yield found, None
            return
        opened: list[Association] = []
        yield destination.host, destination.port, {
            "contexts": store_contexts(found),
            "evt_handlers": [
                (evt.EVT_CONN_OPEN, no_delay),
                (evt.EVT_ESTABLISHED, lambda e: opened.append(e.assoc)),
            ],
        }
        yield len(found)
        yield from self._sub_operations(event, found, lambda: opened[0])

    def _matches(self, event: evt.Event, name: str) -> list[tuple[StoredInstance, Blob]] | int:
        """The stored instances the identifier names, or the failure status to answer."""
        try:
            return self._resolve(event.identifier, event.request.AffectedSOPClassUID)
        except ArchiveError as exc:
            log.info("%s refused: %s", name, exc.message)
            return exc.dimse_status
        except Exception as exc:  # an undecodable identifier, the index unavailable
            log.error("%s failed: %s", name, type(exc).__name__)
            return STATUS_UNABLE_TO_PROCESS

    def _resolve(
        self, identifier: Dataset, sop_class_uid: str
    ) -> list[tuple[StoredInstance, Blob]]:
        """The stored instances the identifier's unique keys name, by the query engine."""
        level = _LEVELS.get(str(identifier.get("QueryRetrieveLevel", "")).strip().upper())
        patient_root = sop_class_uid in _PATIENT_ROOT
        if level is None or (level is Level.PATIENT and not patient_root):
            raise BadRequest("unsupported retrieve level for this information model")
        params = []
        for key_level, keyword in _UNIQUE_KEYS:
            if key_level > level:
                break
            value = _text(identifier.get(keyword))
            if key_level is level and value in ("", "*"):
                raise BadRequest(f"a retrieve at this level needs {keyword}")
            if "*" in value or "?" in value:
                raise BadRequest(f"{keyword}: a retrieve matches single values, not wildcards")
            if value:
                params.append((keyword, value))
        # PATIENT level: the patient's studies (PatientID is the pseudonym the archive gave)
        search_level = max(level, Level.STUDY)
        # on the primary, like the bytes: a read replica may not have what was just stored
        result = self._call(
            self.query.search(search_level, params, None, _MATCH_LIMIT, fresh=True)
        )
        if result.more:
            raise TooManyMatches("too many matches for one retrieve")
        depth = search_level - Level.STUDY + 1
        scopes = [
            tuple(document[tag]["Value"][0] for tag in _UID_TAGS[:depth])
            for document in result.documents
        ]
        return self._call(self.retrieve.in_scopes(scopes))

    def _sub_operations(
        self, event: evt.Event, found: list[tuple[StoredInstance, Blob]],
        store_association: Callable[[], Association],
    ) -> Iterator[tuple[int, Dataset | None]]:
        for item, blob in found:
            if event.is_cancelled:
                yield STATUS_CANCEL, None
                return
            accepted = accepted_syntaxes(store_association(), item.sop_class_uid)
            yield STATUS_PENDING, self._dataset(item, blob, accepted)

    def _dataset(self, item: StoredInstance, blob: Blob, accepted: set[str]) -> Dataset:
        try:
            return self._call(self.retrieve.for_sending(item, blob, accepted))
        except ArchiveError as exc:
            log.info("instance %s not sent: %s", item.sop_uid, exc.message)
        except Exception as exc:
            log.error("instance %s not sent: %s", item.sop_uid, type(exc).__name__)
        return _unsendable(item)


def accepted_syntaxes(association: Association, sop_class_uid: str) -> set[str]:
    """The transfer syntaxes the peer accepted for us to send this SOP class in."""
    return {
        str(context.transfer_syntax[0]) for context in association.accepted_contexts
        if context.abstract_syntax == sop_class_uid and context.as_scu
    }


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


def _unsendable(item: StoredInstance) -> Dataset:
    """A stand-in that pynetdicom cannot send (no transfer syntax), so the sub-operation fails
    and the instance is named in FailedSOPInstanceUIDList."""
    dataset = Dataset()
    dataset.SOPClassUID = item.sop_class_uid
    dataset.SOPInstanceUID = item.sop_uid
    return dataset


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list):
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()
