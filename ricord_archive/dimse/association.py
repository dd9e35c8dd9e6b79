"""One association as a coroutine on the server's event loop: negotiation, then PDUs read by
their header and dispatched. pynetdicom encodes and decodes (PDUs, presentation contexts, DIMSE
messages); the state machine is this module's.

C-STORE and C-ECHO requests are served in turn as they arrive (a sender waits for each
response anyway). C-FIND, C-GET and C-MOVE run as tasks, so that the PDUs that arrive meanwhile
are read: a C-CANCEL for the request, the responses to a C-GET's C-STORE sub-operations.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from ricord_archive.dimse.commands import (
    C_CANCEL_RQ,
    C_FIND_RQ,
    C_GET_RQ,
    C_MOVE_RQ,
    C_STORE_RQ,
    Message,
    decode_command,
    encode_command,
    fragments,
    has_dataset,
)
from ricord_archive.dimse.pdu_guard import (
    INVALID_PARAMETER_VALUE,
    P_DATA_TF,
    UNEXPECTED_PDU,
)
from ricord_archive.dimse.transport import (
    REASON_NOT_SPECIFIED,
    PduStream,
    PeerGone,
    PeerIdle,
    p_data_tf,
    pdvs,
)

log = logging.getLogger(__name__)

A_ASSOCIATE_RQ_TYPE, A_RELEASE_RQ, A_ABORT = 0x01, 0x05, 0x07
_A_RELEASE_RP = bytes([0x06, 0, 0, 0, 0, 4, 0, 0, 0, 0])
_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
LONG_RUNNING = frozenset({C_GET_RQ, C_FIND_RQ, C_MOVE_RQ})


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ (result, source, diagnostic) and why, for the audit trail."""

    result: int
    source: int
    diagnostic: int
    reason: str


# The handler of a DIMSE request: (association, request, its presentation context).
Handler = Callable[["Association", Message, PresentationContext], Awaitable[None]]


class Acceptor(Protocol):
    """What an association asks of the server that accepted its connection."""

    contexts: list[PresentationContext]

    @property
    def handlers(self) -> Mapping[int, tuple[Handler, frozenset[str]]]:
        """By command field: its handler and the abstract syntaxes it serves."""

    async def admit(self, association: Association) -> Rejection | None: ...
    def accepted(self, association: Association) -> None: ...
    def rejected(self, association: Association, rejection: Rejection) -> None: ...
    def closed(self, association: Association, how: str) -> None: ...


@dataclass(frozen=True)
class Timeouts:
    network: float  # a silent peer, a stalled PDU or send
    acse: float  # association request and release
    dimse: float  # the response to a request the archive sent


class Association:
    """The acceptor's side of one association."""

    def __init__(
        self, stream: PduStream, acceptor: Acceptor, address: str, port: int,
        max_pdu_bytes: int, timeouts: Timeouts,
    ) -> None:
        self.stream = stream
        self.acceptor = acceptor
        self.address = address
        self.port = port
        self.max_pdu_bytes = max_pdu_bytes
        self.timeouts = timeouts
        self.calling_aet = ""
        self.called_aet = ""
        self.contexts: dict[int, PresentationContext] = {}
        self.peer_max_pdu = 0  # the requestor's Maximum Length (0: unlimited)
        self.admitted = False  # counted against the association limit
        self.established = False
        # the calling AE title is one an import session expects (None: not asked yet)
        self.importing: bool | None = None
        self._command: list[memoryview] = []  # the fragments of the message being received
        self._data: list[memoryview] = []
        self._message: Message | None = None  # its command, once complete
        self._tasks: dict[int, asyncio.Task[None]] = {}  # long-running requests by message ID
        self._cancelled: set[int] = set()
        self._responses: dict[int, asyncio.Future[Any]] = {}  # our requests by message ID
        self._message_id = 0

    # --- life ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Negotiate, serve until released or aborted, and tell the acceptor how it ended."""
        how = "connection-closed"
        try:
            if await self._negotiate():
                how = await self._serve()
        except PeerGone:
            pass
        except Exception as exc:  # a fault of ours: the peer gets an A-ABORT, the log no value
            log.error("association with %s failed: %s", self.stream.peer, type(exc).__name__)
            how = "aborted"
            await self.stream.abort(REASON_NOT_SPECIFIED)
        except asyncio.CancelledError:  # the server stops: abort what is left
            how = "aborted"
            await self._end_tasks()
            await self.stream.abort(REASON_NOT_SPECIFIED)
            raise
        finally:
            await self._end_tasks()
            await self.stream.close()
            if self.established:
                self.established = False
                self.acceptor.closed(self, how)

    async def _negotiate(self) -> bool:
        pdu_type, body = await self.stream.read(self.timeouts.acse)
        if pdu_type != A_ASSOCIATE_RQ_TYPE:
            log.info("DIMSE peer %s: PDU 0x%02X before any association: A-ABORT",
                     self.stream.peer, pdu_type)
            await self.stream.abort(UNEXPECTED_PDU)
            return False
        try:
            request = A_ASSOCIATE_RQ()
            request.decode(struct.pack(">BxL", pdu_type, len(body)) + body)
            primitive = request.to_primitive()
            self.calling_aet = str(primitive.calling_ae_title or "").strip()
            self.called_aet = str(primitive.called_ae_title or "").strip()
            roles = self._read_user_information(primitive)
        except Exception as exc:
            log.info("DIMSE peer %s: undecodable association request (%s): A-ABORT",
                     self.stream.peer, type(exc).__name__)
            await self.stream.abort(INVALID_PARAMETER_VALUE)
            return False
        rejection = await self.acceptor.admit(self)
        if rejection is not None:
            self.acceptor.rejected(self, rejection)
            await self._reject(rejection)
            return False
        results, role_items = negotiate_as_acceptor(
            primitive.presentation_context_definition_list, self.acceptor.contexts, roles
        )
        self.contexts = {cx.context_id: cx for cx in results
                         if cx.result == 0x00 and cx.context_id is not None}
        self.stream.write(self._acceptance(primitive, results, role_items))
        await self.stream.drain()
        self.established = True
        self.acceptor.accepted(self)
        return True

    def _read_user_information(
        self, primitive: A_ASSOCIATE,
    ) -> dict[UID, tuple[bool | None, bool | None]]:
        """The requestor's Maximum Length; its SCP/SCU role selections by SOP class."""
        roles = {}
        for item in primitive.user_information:
            if isinstance(item, MaximumLengthNotification):
                self.peer_max_pdu = int(item.maximum_length_received or 0)
            elif (isinstance(item, SCP_SCU_RoleSelectionNegotiation)
                  and item.sop_class_uid is not None):  # always set in a decoded item
                roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
        if 0 < self.peer_max_pdu < 16:
            raise ValueError("maximum length too small")
        return roles

    def _acceptance(
        self, request: A_ASSOCIATE, results: list[PresentationContext],
        role_items: list[SCP_SCU_RoleSelectionNegotiation],
    ) -> bytes:
        primitive = A_ASSOCIATE()
        primitive.application_context_name = _APPLICATION_CONTEXT
        primitive.calling_ae_title = request.calling_ae_title
        primitive.called_ae_title = request.called_ae_title
        primitive.result = 0x00
        primitive.result_source = 0x01
        primitive.presentation_context_definition_results_list = results
        maximum = MaximumLengthNotification()
        maximum.maximum_length_received = self.max_pdu_bytes
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
        primitive.user_information = [maximum, implementation, version, *role_items]
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(primitive)
        return pdu.encode()

    async def _reject(self, rejection: Rejection) -> None:
        primitive = A_ASSOCIATE()
        primitive.result = rejection.result
        primitive.result_source = rejection.source
        primitive.diagnostic = rejection.diagnostic
        pdu = A_ASSOCIATE_RJ()
        pdu.from_primitive(primitive)
        self.stream.write(pdu.encode())
        await self.stream.close()

    async def _serve(self) -> str:
        """Read and dispatch until the peer releases or aborts; how it ended."""
        while True:
            pdu_type, body = await self._read()
            if pdu_type == P_DATA_TF:
                values = pdvs(body)
                if values is None or any(cid not in self.contexts for cid, _ in values):
                    log.info("DIMSE peer %s: malformed P-DATA-TF: A-ABORT", self.stream.peer)
                    await self.stream.abort(INVALID_PARAMETER_VALUE)
                    return "aborted"
                for context_id, value in values:
                    if not await self._fragment(context_id, value):
                        return "aborted"
            elif pdu_type == A_RELEASE_RQ:
                await self._end_tasks()
                self.stream.write(_A_RELEASE_RP)
                return "released"
            elif pdu_type == A_ABORT:
                return "aborted"
            else:
                log.info("DIMSE peer %s: unexpected PDU 0x%02X: A-ABORT", self.stream.peer,
                         pdu_type)
                await self.stream.abort(UNEXPECTED_PDU)
                return "aborted"

    async def _read(self) -> tuple[int, bytes]:
        """The next PDU: a peer may stay silent for the network timeout, or as long as a request
        of its is in progress."""
        while True:
            try:
                return await self.stream.read(
                    self.timeouts.network, retry_on_idle=bool(self._tasks)
                )
            except PeerIdle:  # silent while a request of its is in progress: keep waiting
                continue

    async def _end_tasks(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for future in self._responses.values():
            future.cancel()

    # --- messages in --------------------------------------------------------------------------

    async def _fragment(self, context_id: int, value: memoryview) -> bool:
        """Add one presentation data value to the message being received; dispatch the message
        once complete. False when the association was aborted."""
        control, data = value[0], value[1:]
        if control & 0x01:  # command
            if self._message is not None:
                return await self._malformed("a command fragment within a data set")
            self._command.append(data)
            if not control & 0x02:
                return True
            try:
                command = decode_command(b"".join(self._command))
            except ValueError:
                return await self._malformed("an undecodable command set")
            self._command = []
            message = Message(context_id, command)
            if has_dataset(command):
                self._message = message
                return True
            return await self._dispatch(message)
        if self._message is None or context_id != self._message.context_id:
            return await self._malformed("a data set fragment without its command")
        self._data.append(data)
        if not control & 0x02:
            return True
        message, self._message = self._message, None
        message.dataset, self._data = b"".join(self._data), []
        return await self._dispatch(message)

    async def _malformed(self, what: str) -> bool:
        log.info("DIMSE peer %s sent %s: A-ABORT", self.stream.peer, what)
        await self.stream.abort(INVALID_PARAMETER_VALUE)
        return False

    async def _dispatch(self, message: Message) -> bool:
        command = message.command
        field = command["CommandField"]
        if field & 0x8000:  # a response to a request of ours
            future = self._responses.pop(command.get("MessageIDBeingRespondedTo", -1), None)
            if future is not None and not future.done():
                future.set_result(command)
            return True
        if field == C_CANCEL_RQ:
            cancelled = command.get("MessageIDBeingRespondedTo", -1)
            if cancelled in self._tasks:
                self._cancelled.add(cancelled)
            return True
        context = self.contexts[message.context_id]
        handler, abstract_syntaxes = self.acceptor.handlers.get(field, (None, frozenset()))
        if (handler is None or "MessageID" not in command
                or context.abstract_syntax not in abstract_syntaxes):
            log.info("DIMSE peer %s: command 0x%04X unsupported on its presentation context: "
                     "A-ABORT", self.stream.peer, field)
            await self.stream.abort(UNEXPECTED_PDU)
            return False
        if field not in LONG_RUNNING:
            await handler(self, message, context)
            return True
        message_id = command["MessageID"]
        task = asyncio.create_task(self._run_request(handler, message, context))
        self._tasks[message_id] = task
        task.add_done_callback(lambda _: self._done(message_id, task))
        return True

    async def _run_request(self, handler: Handler, message: Message,
                           context: PresentationContext) -> None:
        try:
            await handler(self, message, context)
        except PeerGone:
            pass
        except Exception as exc:  # a fault of ours: the peer gets an A-ABORT, the log no value
            log.error("association with %s failed: %s", self.stream.peer, type(exc).__name__)
            await self.stream.abort(REASON_NOT_SPECIFIED)

    def _done(self, message_id: int, task: asyncio.Task[None]) -> None:
        if self._tasks.get(message_id) is task:
            del self._tasks[message_id]
            self._cancelled.discard(message_id)

    def is_cancelled(self, message_id: int) -> bool:
        """Whether the peer sent a C-CANCEL for its request `message_id`."""
        return message_id in self._cancelled

    # --- messages out -------------------------------------------------------------------------

    async def send(self, command: dict[str, Any], context_id: int,
                   dataset: bytes | None = None) -> None:
        """Send a DIMSE message in P-DATA-TF PDUs no longer than the peer's Maximum Length."""
        encoded = encode_command(command, dataset is not None)
        for value in fragments(encoded, dataset, self.peer_max_pdu):
            self.stream.write(p_data_tf(context_id, value))
        await self.stream.drain()

    async def respond(self, request: Message, context: PresentationContext, status: int,
                      dataset: bytes | None = None, **fields: Any) -> None:
        """The response to `request` (its command field with the response bit)."""
        assert context.context_id is not None  # an accepted context has its id
        await self.send({
            "AffectedSOPClassUID": request.command.get("AffectedSOPClassUID"),
            "CommandField": request.command["CommandField"] | 0x8000,
            "MessageIDBeingRespondedTo": request.command["MessageID"],
            "Status": status, **fields,
        }, context.context_id, dataset)

    async def send_c_store(
        self, context: PresentationContext, sop_class_uid: str, sop_instance_uid: str,
        dataset: bytes,
    ) -> int | None:
        """A C-STORE request on this association (a C-GET's sub-operation): the status the peer
        answered, None when it answered nothing within the DIMSE timeout."""
        assert context.context_id is not None  # an accepted context has its id
        self._message_id = message_id = self._message_id % 0xFFFF + 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._responses[message_id] = future
        await self.send({
            "AffectedSOPClassUID": sop_class_uid, "CommandField": C_STORE_RQ,
            "MessageID": message_id, "Priority": 0x0002,
            "AffectedSOPInstanceUID": sop_instance_uid,
        }, context.context_id, dataset)
        try:
            async with asyncio.timeout(self.timeouts.dimse):
                response = await future
        except TimeoutError:
            self._responses.pop(message_id, None)
            return None
        return response.get("Status")
