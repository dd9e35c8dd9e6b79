"""The DIMSE side of the audit trail: associations opened and closed (Network Entry, Attach and
Detach), rejected (Security Alert, Node Authentication), and C-GET/C-MOVE transfers begun."""

from __future__ import annotations

import time
from typing import Any

from ricord_archive import audit_trail
from ricord_archive.blobstore import Blob
from ricord_archive.config import Config
from ricord_archive.dimse.association import Association
from ricord_archive.errors import NotAuthorized
from ricord_archive.instances import StoredInstance
from ricord_archive.runtime import logs


def actor(association: Association, config: Config) -> audit_trail.Actor:
    """The peer: its calling AE title, and the site that title belongs to."""
    site = config.site_for_aet(association.calling_aet)
    return audit_trail.Actor(association.calling_aet, "calling-ae", site.name if site else None,
                       association.address)


def refused_without_site(association: Association, config: Config) -> audit_trail.AuditEvent:
    """A C-STORE refused (0x0124) because its calling AE title belongs to no site."""
    refusal = NotAuthorized("the calling AE title belongs to no site", "calling-ae-without-site")
    return audit_trail.instance_refused(actor(association, config), "C-STORE", None, refusal)


def transfer(
    association: Association, config: Config, protocol: str,
    found: list[tuple[StoredInstance, Blob]] | int | None, destination: str | None = None,
) -> audit_trail.AuditEvent:
    """A C-GET or C-MOVE: what the identifier resolved to, or the failure status answered
    (None: the move destination is unknown)."""
    who = actor(association, config)
    detail: dict[str, Any] = {"destination": destination} if destination else {}
    if found is None:
        return audit_trail.transfer_begun(who, protocol, [], 0, audit_trail.Outcome.MINOR_FAILURE,
                                    {"reason": "move-destination-unknown"})
    if isinstance(found, int):
        return audit_trail.transfer_begun(who, protocol, [], 0, audit_trail.Outcome.MINOR_FAILURE,
                                    {**detail, "status": found})
    studies = list(dict.fromkeys(item.study_uid for item, _ in found))
    return audit_trail.transfer_begun(who, protocol, studies, len(found),
                                      audit_trail.Outcome.SUCCESS, detail)


class AssociationAudit:
    """Each association recorded once opened and once closed, and each rejection."""

    def __init__(self, trail: audit_trail.AuditTrail, config: Config) -> None:
        self.trail = trail
        self.config = config
        self._open: dict[Association, tuple[str, float]] = {}

    def accepted(self, association: Association) -> None:
        number = logs.association_id.get() or logs.new_id()  # as in the log lines
        self._open[association] = (number, time.monotonic())
        self.trail.record(
            audit_trail.association(actor(association, self.config), True, {"association": number})
        )

    def closed(self, association: Association, how: str) -> None:
        opened = self._open.pop(association, None)
        if opened is None:
            return
        number, since = opened
        self.trail.record(audit_trail.association(actor(association, self.config), False, {
            "association": number, "ended": how, "seconds": round(time.monotonic() - since, 3),
        }))

    def rejected(self, association: Association, reason: str) -> None:
        self.trail.record(audit_trail.association_rejected(actor(association, self.config), reason))
