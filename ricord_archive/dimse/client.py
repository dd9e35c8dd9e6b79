"""The archive as a DIMSE client of a hospital PACS, for imports: C-FIND studies (Study Root),
C-MOVE one to an AE title, or C-GET one and receive its C-STORE sub-operations on the same
association. Blocking (pynetdicom); callers run it in a thread."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.events import EventHandlerType
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from ricord_archive.dicom.status import PENDING, PENDING_WARNING, SUB_OPERATIONS_FAILED, SUCCESS
from ricord_archive.dimse.network import no_delay
from ricord_archive.dimse.server import TRANSFER_SYNTAXES

_ADDRESS = re.compile(r"^([\x20-\x7e]{1,16})@(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})\Z")
_PENDING = (PENDING, PENDING_WARNING)
_MAX_STORAGE_CONTEXTS = 127  # 128 presentation contexts, one of them for C-GET


class PacsError(Exception):
    """The PACS could not be reached or failed a request. `transient`: worth trying again.
    Messages name no DICOM value."""

    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class PacsAddress:
    aet: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> PacsAddress:
        """`AET@host:port` (an IPv6 host in brackets)."""
        match = _ADDRESS.match(text)
        if match is None:
            raise ValueError(f"{text!r} is not AET@host:port")
        aet, host, port = match.group(1), match.group(2).strip("[]"), int(match.group(3))
        if aet != aet.strip() or not 0 < port < 65536:
            raise ValueError(f"{text!r} is not AET@host:port")
        return cls(aet, host, port)

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Transfer:
    """The final response of a C-MOVE or C-GET: its status and sub-operation counts."""

    status: int
    completed: int
    failed: int
    warning: int


class PacsClient:
    def __init__(self, pacs: PacsAddress, calling_aet: str, timeout: float = 120) -> None:
        self.pacs = pacs
        self.calling_aet = calling_aet
        self.timeout = timeout

    def find_studies(self, keys: dict[str, str]) -> list[Dataset]:
        """The STUDY-level C-FIND answers for `keys` (keyword -> value; '' asks for a key)."""
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        for keyword, value in keys.items():
            setattr(identifier, keyword, value)
        association = self._associate([(StudyRootQueryRetrieveInformationModelFind, None)])
        try:
            found = []
            for status, answer in association.send_c_find(
                identifier, StudyRootQueryRetrieveInformationModelFind
            ):
                code = _status(status, "C-FIND")
                if code in _PENDING:
                    if answer is not None:
                        found.append(answer)
                elif code != SUCCESS:
                    raise PacsError(f"the PACS failed the C-FIND (status 0x{code:04X})",
                                    transient=transient_status(code))
            return found
        finally:
            _release(association)

    def move_study(self, study_uid: str, destination: str) -> Transfer:
        """C-MOVE one study to the AE title `destination` (the PACS must know where it is)."""
        association = self._associate([(StudyRootQueryRetrieveInformationModelMove, None)])
        try:
            return _transfer(association.send_c_move(
                _study(study_uid), destination, StudyRootQueryRetrieveInformationModelMove
            ), "C-MOVE")
        finally:
            _release(association)

    def get_study(
        self, study_uid: str, sop_classes: Iterable[str], on_store: Callable[[bytes], int]
    ) -> Transfer:
        """C-GET one study; each object the PACS sends goes to `on_store` (Part 10 bytes),
        which answers the C-STORE status. Only `sop_classes` (at most 127) are offered."""
        classes = sorted(sop_classes)[:_MAX_STORAGE_CONTEXTS]
        contexts: list[tuple[str, list[str] | None]] = [
            (StudyRootQueryRetrieveInformationModelGet, None),
            *((c, TRANSFER_SYNTAXES) for c in classes),
        ]
        association = self._associate(
            contexts, roles=[build_role(c, scp_role=True) for c in classes],
            on_store=lambda event: on_store(event.encoded_dataset(include_meta=True)),
        )
        try:
            return _transfer(association.send_c_get(
                _study(study_uid), StudyRootQueryRetrieveInformationModelGet
            ), "C-GET")
        finally:
            _release(association)

    def _associate(
        self, contexts: list[tuple[str, list[str] | None]],
        roles: list[SCP_SCU_RoleSelectionNegotiation] | None = None,
        on_store: Callable[[evt.Event], int] | None = None,
    ) -> Association:
        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.maximum_pdu_size = 0
        for abstract, syntaxes in contexts:
            if syntaxes is None:
                ae.add_requested_context(abstract)
            else:
                ae.add_requested_context(abstract, syntaxes)
        handlers: list[EventHandlerType] = [(evt.EVT_CONN_OPEN, no_delay)]
        if on_store is not None:
            handlers.append((evt.EVT_C_STORE, on_store))
        association = ae.associate(
            self.pacs.host, self.pacs.port, ae_title=self.pacs.aet,
            ext_neg=[*roles] if roles else None, evt_handlers=handlers,
        )
        if association.is_rejected:
            raise PacsError(f"the PACS {self.pacs} rejected the association (check its AE "
                            f"title and that it knows {self.calling_aet})", transient=False)
        if not association.is_established:
            raise PacsError(f"no association with the PACS {self.pacs}", transient=True)
        return association


def _study(study_uid: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    return identifier


def _status(status: Dataset, request: str) -> int:
    if "Status" not in status:  # pynetdicom's answer to a timeout, an abort or a bad response
        raise PacsError(f"the PACS did not answer the {request} (timeout or abort)",
                        transient=True)
    return int(status.Status)


def transient_status(code: int) -> bool:
    """Out of resources (0xA7xx), except 0xA702: the sub-operations themselves failed."""
    return 0xA700 <= code <= 0xA7FF and code != SUB_OPERATIONS_FAILED


def _transfer(responses: Iterable[tuple[Dataset, Dataset | None]], request: str) -> Transfer:
    """The final response's status and counts; pending responses are read through."""
    for status, _ in responses:
        code = _status(status, request)
        if code in _PENDING:
            continue
        return Transfer(
            code, int(status.get("NumberOfCompletedSuboperations", 0) or 0),
            int(status.get("NumberOfFailedSuboperations", 0) or 0),
            int(status.get("NumberOfWarningSuboperations", 0) or 0),
        )
    raise PacsError(f"the PACS did not finish the {request}", transient=True)


def _release(association: Association) -> None:
    if association.is_established:
        association.release()
