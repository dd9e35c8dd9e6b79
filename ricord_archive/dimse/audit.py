"""The DIMSE side of the audit trail: associations opened and closed (Network Entry, Attach and
Detach), rejected (Security Alert, Node Authentication), and C-GET/C-MOVE transfers begun."""

from __future__ import annotations

import threading
import time
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association

from ricord_archive import audit
from ricord_archive.config import Config
from ricord_archive.errors import NotAuthorized
from ricord_archive.index.reads import StoredInstance


def actor(association: Association, config: Config) -> audit.Actor:
    """The peer: its calling AE title, and the site that title belongs to."""
    requestor = association.requestor
    site = config.site_for_aet(requestor.ae_title)
    return audit.Actor(requestor.ae_title.strip(), "calling-ae", site.name if site else None,
                       requestor.address)


def _rejection_reason(association: Association) -> str:
    """Why pynetdicom rejected: the association limit, or an unknown calling AE title."""
    ae = association.ae
    if len([a for a in ae.active_associations if a.is_acceptor]) > ae.maximum_associations:
        return "local-limit-exceeded"
    allowed = ae.require_calling_aet
    if allowed and association.requestor.ae_title not in allowed:
        return "calling-ae-title-not-recognised"
    return "rejected"


def refused_without_site(association: Association, config: Config) -> audit.AuditEvent:
    """A C-STORE refused (0x0124) because its calling AE title belongs to no site."""
    refusal = NotAuthorized("the calling AE title belongs to no site", "calling-ae-without-site")
    return audit.instance_refused(actor(association, config), "C-STORE", None, refusal)


def transfer(
    association: Association, config: Config, protocol: str,
    found: list[tuple[StoredInstance, Path]] | int | None, destination: str | None = None,
) -> audit.AuditEvent:
    """A C-GET or C-MOVE: what the identifier resolved to, or the failure status answered
    (None: the move destination is unknown)."""
    who = actor(association, config)
    detail: dict[str, Any] = {"destination": destination} if destination else {}
    if found is None:
        return audit.transfer_begun(who, protocol, [], 0, audit.Outcome.MINOR_FAILURE,
                                    {"reason": "move-destination-unknown"})
    if isinstance(found, int):
        return audit.transfer_begun(who, protocol, [], 0, audit.Outcome.MINOR_FAILURE,
                                    {**detail, "status": found})
    studies = list(dict.fromkeys(item.study_uid for item, _ in found))
    return audit.transfer_begun(who, protocol, studies, len(found), audit.Outcome.SUCCESS,
                                detail)


class AssociationAudit:
    """Notification handlers recording each association once opened and once closed."""

    def __init__(self, trail: audit.AuditTrail, config: Config) -> None:
        self.trail = trail
        self.config = config
        self._open: weakref.WeakKeyDictionary[Association, tuple[str, float]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def handlers(self) -> list[tuple[evt.NotificationEvent, Callable[[evt.Event], None]]]:
        return [
            (evt.EVT_ACCEPTED, self._accepted),
            (evt.EVT_REJECTED, self._rejected),
            (evt.EVT_RELEASED, lambda event: self._closed(event, "released")),
            (evt.EVT_ABORTED, lambda event: self._closed(event, "aborted")),
            (evt.EVT_CONN_CLOSE, lambda event: self._closed(event, "connection-closed")),
        ]

    def _accepted(self, event: evt.Event) -> None:
        number = uuid.uuid4().hex[:16]
        with self._lock:
            self._open[event.assoc] = (number, time.monotonic())
        self.trail.record(
            audit.association(actor(event.assoc, self.config), True, {"association": number})
        )

    def _closed(self, event: evt.Event, how: str) -> None:
        with self._lock:
            opened = self._open.pop(event.assoc, None)
        if opened is None:  # closed before: release or abort comes before the connection's end
            return
        number, since = opened
        self.trail.record(audit.association(actor(event.assoc, self.config), False, {
            "association": number, "ended": how, "seconds": round(time.monotonic() - since, 3),
        }))

    def _rejected(self, event: evt.Event) -> None:
        self.trail.record(audit.association_rejected(
            actor(event.assoc, self.config), _rejection_reason(event.assoc)
        ))
