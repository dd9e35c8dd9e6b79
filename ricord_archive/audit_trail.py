"""The audit trail's events: PHI-free by construction. Pure: no sockets, no database.

The vocabulary follows the DICOM audit messages of PS3.15 A.5: EventID (DCM codes of CID 400),
EventTypeCode (CID 401, 402, 403), EventActionCode (C, R, U, D, E) and EventOutcomeIndicator
(0, 4, 8, 12). An event names its resource only by de-identified UIDs the index holds, never by
anything a request carried (a client may send original UIDs, names or IDs): query keys are
recorded by attribute keyword without their values, HTTP paths by their route template.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum, IntEnum, StrEnum
from typing import Any, Protocol, TypeVar

from ricord_archive.errors import ArchiveError, RefusedObject, StorageUnavailable
from ricord_archive.search.model import CONTROL_PARAMETERS, Level, attribute_path

T = TypeVar("T")
_MAX_LISTED_STUDIES = 100


class SearchPage(Protocol):
    @property
    def documents(self) -> list[Any]: ...


P = TypeVar("P", bound=SearchPage)


class _Coded(Enum):
    """A DCM coded concept: (code value, code meaning)."""

    @property
    def code(self) -> str:
        return self.value[0]

    @property
    def meaning(self) -> str:
        return self.value[1]


class EventId(_Coded):
    """PS3.15 A.5.3 audit message EventIDs: (DCM code, meaning)."""

    AUDIT_LOG_USED = ("110101", "Audit Log Used")
    EXPORT = ("110106", "Export")
    IMPORT = ("110107", "Import")
    BEGIN_TRANSFERRING = ("110102", "Begin Transferring DICOM Instances")
    INSTANCES_TRANSFERRED = ("110104", "DICOM Instances Transferred")
    NETWORK_ENTRY = ("110108", "Network Entry")
    QUERY = ("110112", "Query")
    SECURITY_ALERT = ("110113", "Security Alert")
    USER_AUTHENTICATION = ("110114", "User Authentication")


class EventType(_Coded):
    """EventTypeCodes of the events that have one: (DCM code, meaning)."""

    LOGIN = ("110122", "Login")
    ATTACH = ("110124", "Attach")
    DETACH = ("110125", "Detach")
    NODE_AUTHENTICATION = ("110126", "Node Authentication")
    USE_OF_RESTRICTED_FUNCTION = ("110132", "Use of Restricted Function")


class Action(StrEnum):
    """EventActionCode."""

    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


class Outcome(IntEnum):
    """EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4  # e.g. invalid input: refused, not found
    SERIOUS_FAILURE = 8  # the action was terminated: index or disk unavailable
    MAJOR_FAILURE = 12  # the action was made unavailable: an internal error


EVENT_IDS = {e.code: e for e in EventId}
EVENT_TYPES = {e.code: e for e in EventType}


@dataclass(frozen=True)
class Actor:
    """Who acted: a token's name or a calling AE title, the role, the site, the peer address."""

    who: str | None
    role: str
    site: str | None
    address: str | None


@dataclass(frozen=True)
class AuditEvent:
    event_id: EventId
    action: Action
    outcome: Outcome
    actor: Actor
    protocol: str  # DIMSE, STOW-RS, QIDO-RS, WADO-RS, WADO-URI, HTTP, CLI
    resource: str | None = None  # a route template, a query level, "association"
    event_type: EventType | None = None
    site: str | None = None  # the site the object was filed under; else the actor's
    study_uid: str | None = None  # de-identified UIDs only
    series_uid: str | None = None
    sop_uid: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)  # fixed labels and numbers only
    at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))


class AuditTrail(Protocol):
    def record(self, event: AuditEvent) -> None:
        """Take an event without blocking; callable from any thread."""


class NoAudit:
    """The trail when auditing is off: events are dropped."""

    def record(self, event: AuditEvent) -> None:
        pass


NO_AUDIT = NoAudit()


def failure_outcome(exc: BaseException) -> Outcome:
    """Refusals and bad requests are minor, an unavailable index or disk serious, the rest
    major."""
    if isinstance(exc, StorageUnavailable):
        return Outcome.SERIOUS_FAILURE
    if isinstance(exc, ArchiveError):
        return Outcome.MINOR_FAILURE
    return Outcome.MAJOR_FAILURE


def failure_reason(exc: BaseException) -> str:
    """A fixed label for a failure: a refusal's reason code, else the exception's class."""
    if isinstance(exc, RefusedObject):
        return exc.reason
    return type(exc).__name__


# --- stored objects -------------------------------------------------------------------------

_STORE_ACTIONS = {"inserted": Action.CREATE, "duplicate": Action.READ}


def instance_stored(actor: Actor, protocol: str, site: str, result: Any) -> AuditEvent:
    """A stored (or already stored) object; `result` is ingest's StoreResult. Action C for a new
    object, R when the archive already held it (PS3.15 A.5.3.4)."""
    duplicate = "duplicate" if result.duplicate else "inserted"
    detail: dict[str, Any] = {"stored": duplicate}
    outcome = Outcome.SUCCESS
    if result.warning:  # re-sent with other content, first kept: not stored as sent
        detail["status"] = result.warning
        detail["stored"] = "duplicate-other-content-first-kept"
        outcome = Outcome.MINOR_FAILURE
    return AuditEvent(
        EventId.INSTANCES_TRANSFERRED, _STORE_ACTIONS[duplicate], outcome, actor, protocol,
        resource="instance", site=site, study_uid=result.study_uid,
        series_uid=result.series_uid, sop_uid=result.sop_uid, detail=detail,
    )


def instance_refused(
    actor: Actor, protocol: str, site: str | None, exc: BaseException
) -> AuditEvent:
    """An object not stored: refused by policy, invalid, or the index unavailable."""
    detail: dict[str, Any] = {"reason": failure_reason(exc)}
    if isinstance(exc, ArchiveError):
        detail["status"] = exc.dimse_status if protocol.startswith("C-") else exc.failure_reason
    return AuditEvent(
        EventId.INSTANCES_TRANSFERRED, Action.CREATE, failure_outcome(exc), actor, protocol,
        resource="instance", site=site,
        sop_uid=exc.sop_uid if isinstance(exc, ArchiveError) else None, detail=detail,
    )


async def storing(
    trail: AuditTrail, actor: Actor, protocol: str, site: str, store: Awaitable[T]
) -> T:
    """Await ingest's storing of an object and record its outcome (ingest calls this for every
    object it takes); the result or error passes through."""
    try:
        result = await store
    except Exception as exc:
        trail.record(instance_refused(actor, protocol, site, exc))
        raise
    trail.record(instance_stored(actor, protocol, site, result))
    return result


# --- queries ----------------------------------------------------------------------------------

def query_keywords(params: Iterable[tuple[str, str]]) -> list[str]:
    """The attribute keywords a query matched on (non-universal values), never the values;
    a key that is no DICOM attribute is counted as 'unknown' (its name could be anything)."""
    used: set[str] = set()
    for key, value in params:
        if key in CONTROL_PARAMETERS or value.strip(" ") in ("", "*"):
            continue
        path = attribute_path(key)
        used.add(path[0] if path is not None else "unknown")
    return sorted(used)


def queried(
    actor: Actor, protocol: str, level: Level, keywords: list[str], matches: int | None,
    exc: BaseException | None = None,
) -> AuditEvent:
    detail: dict[str, Any] = {"keys": keywords}
    if exc is None:
        detail["matches"] = matches
    else:
        detail["reason"] = failure_reason(exc)
    return AuditEvent(
        EventId.QUERY, Action.EXECUTE, Outcome.SUCCESS if exc is None else failure_outcome(exc),
        actor, protocol, resource=level.name, site=actor.site, detail=detail,
    )


async def querying(
    trail: AuditTrail, actor: Actor, protocol: str, level: Level,
    params: Iterable[tuple[str, str]], search: Awaitable[P],
) -> P:
    """Await the query service's `search(...)` and record the query (keywords and the number of
    matches on this page); the result or error passes through."""
    keywords = query_keywords(params)
    try:
        result = await search
    except Exception as exc:
        trail.record(queried(actor, protocol, level, keywords, None, exc))
        raise
    trail.record(queried(actor, protocol, level, keywords, len(result.documents)))
    return result


# --- retrievals -------------------------------------------------------------------------------

def retrieved(
    actor: Actor, protocol: str, resource: str | None, uids: tuple[str, ...],
    outcome: Outcome, detail: Mapping[str, Any],
) -> AuditEvent:
    """A WADO-RS or WADO-URI request; `uids` (study, series, instance, as far as named) only when
    it succeeded, so they are UIDs the index holds."""
    study, series, sop = (*uids, None, None, None)[:3]
    return AuditEvent(
        EventId.INSTANCES_TRANSFERRED, Action.READ, outcome, actor, protocol,
        resource=resource, site=actor.site, study_uid=study, series_uid=series, sop_uid=sop,
        detail=detail,
    )


def transfer_begun(
    actor: Actor, protocol: str, study_uids: list[str], instances: int,
    outcome: Outcome, detail: Mapping[str, Any],
) -> AuditEvent:
    """A C-GET or C-MOVE: the instances found (their studies, from the index) about to be sent."""
    return AuditEvent(
        EventId.BEGIN_TRANSFERRING, Action.EXECUTE, outcome, actor, protocol,
        resource="instances", site=actor.site,
        study_uid=study_uids[0] if len(study_uids) == 1 else None,
        detail={**detail, "instances": instances, "studies": len(study_uids),
                "study_uids": study_uids[:_MAX_LISTED_STUDIES]},
    )


# --- associations and access control ------------------------------------------------------

def association(actor: Actor, opened: bool, detail: Mapping[str, Any]) -> AuditEvent:
    """A DIMSE association opened (Attach) or closed (Detach): a minor failure unless it was
    released."""
    clean = opened or detail.get("ended") == "released"
    return AuditEvent(
        EventId.NETWORK_ENTRY, Action.EXECUTE,
        Outcome.SUCCESS if clean else Outcome.MINOR_FAILURE, actor, "DIMSE",
        resource="association", event_type=EventType.ATTACH if opened else EventType.DETACH,
        site=actor.site, detail=detail,
    )


def association_rejected(actor: Actor, reason: str) -> AuditEvent:
    return AuditEvent(
        EventId.SECURITY_ALERT, Action.EXECUTE, Outcome.MINOR_FAILURE, actor, "DIMSE",
        resource="association", event_type=EventType.NODE_AUTHENTICATION, site=actor.site,
        detail={"reason": reason},
    )


def access_refused(actor: Actor, status: int, route: str | None, method: str) -> AuditEvent:
    """HTTP 401 (no known credentials: User Authentication failed) or 403 (the role may not:
    Security Alert, use of a restricted function)."""
    unknown = status == 401
    return AuditEvent(
        EventId.USER_AUTHENTICATION if unknown else EventId.SECURITY_ALERT, Action.EXECUTE,
        Outcome.MINOR_FAILURE, actor, "HTTP", resource=route,
        event_type=EventType.LOGIN if unknown else EventType.USE_OF_RESTRICTED_FUNCTION,
        site=actor.site, detail={"status": status, "method": method},
    )


def clinical_imported(
    actor: Actor, protocol: str, site: str, counts: Mapping[str, Any],
    exc: BaseException | None = None,
) -> AuditEvent:
    """A clinical sheet imported (counts of rows only, never a value) or refused whole."""
    detail = dict(counts) if exc is None else {"reason": failure_reason(exc)}
    return AuditEvent(
        EventId.IMPORT, Action.CREATE, Outcome.SUCCESS if exc is None else failure_outcome(exc),
        actor, protocol, resource="clinical", site=site, detail=detail,
    )


def clinical_exported(
    actor: Actor, protocol: str, site: str | None, keywords: list[str], rows: int,
) -> AuditEvent:
    """Clinical rows exported: the filters' column names and the number of rows."""
    return AuditEvent(
        EventId.EXPORT, Action.READ, Outcome.SUCCESS, actor, protocol, resource="clinical",
        site=site, detail={"keys": keywords, "rows": rows},
    )


def audit_log_used(actor: Actor, filters: Mapping[str, Any], rows: int) -> AuditEvent:
    return AuditEvent(
        EventId.AUDIT_LOG_USED, Action.READ, Outcome.SUCCESS, actor, "CLI",
        resource="audit_event", detail={"filters": sorted(filters), "rows": rows},
    )


def cohort_downloaded(
    actor: Actor, resource: str | None, cohort_id: int, studies: int, sent: int,
    outcome: Outcome, status: int,
) -> AuditEvent:
    """A cohort's ZIP, manifest or metadata.csv handed out: the cohort, its number of studies
    and the bytes sent (never a name or value of it)."""
    return AuditEvent(
        EventId.INSTANCES_TRANSFERRED, Action.READ, outcome, actor, "HTTP", resource=resource,
        site=actor.site, detail={"cohort": cohort_id, "studies": studies, "bytes": sent,
                                 "status": status},
    )
