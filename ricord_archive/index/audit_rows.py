"""Writing and reading the audit trail (the `audit_event` table of migrations/008).

Requests never wait for the audit: `AuditWriter.record` only appends to a bounded buffer (from
any thread), and a task on the event loop writes the buffer with one COPY every 100 ms, or as
soon as a batch is full. When the buffer is full, events are dropped, counted and logged rather
than holding a request up; when PostgreSQL is away, they wait in the buffer for it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
import threading
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from ricord_archive.audit_trail import AuditEvent
from ricord_archive.errors import IndexUnavailable
from ricord_archive.index.database import translating

log = logging.getLogger(__name__)

COLUMNS = (
    "at", "event_id", "event_type", "action", "outcome", "who", "role", "site", "source",
    "protocol", "resource", "study_uid", "series_uid", "sop_uid", "detail",
)


def _row(event: AuditEvent) -> tuple[Any, ...]:
    actor = event.actor
    return (
        event.at, event.event_id.code, event.event_type.code if event.event_type else None,
        event.action.value, int(event.outcome), actor.who, actor.role, event.site,
        actor.address, event.protocol, event.resource, event.study_uid, event.series_uid,
        event.sop_uid, orjson.dumps(event.detail).decode(),
    )


class AuditWriter:
    """The archive's audit trail: a bounded buffer written to the index in batches."""

    def __init__(
        self, rows: AuditRows, capacity: int = 20_000, batch: int = 500,
        interval: float = 0.1,
    ) -> None:
        self.rows = rows
        self.capacity = capacity
        self.batch = batch
        self.interval = interval
        self.dropped = 0
        self._reported_drops = 0
        self._failing = False  # the last write failed: said once, not every 100 ms
        self._stopping = False
        self._pending: collections.deque[AuditEvent] = collections.deque()
        self._lock = threading.Lock()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def buffered(self) -> int:
        """Events waiting to be written."""
        return len(self._pending)

    def record(self, event: AuditEvent) -> None:
        """Buffer an event (any thread, never blocks); drop and count it when full."""
        with self._lock:
            if len(self._pending) >= self.capacity:
                self.dropped += 1
                return
            self._pending.append(event)
            full = len(self._pending) == self.batch
        if full and self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Let the writer task finish its last round (never cut off in the middle of a write),
        then write what is still buffered (one attempt)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        await self.flush()
        self._report_drops()
        with self._lock:
            left = len(self._pending)
        if left:
            log.warning("audit: %d events could not be written before stopping", left)

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            await self.flush()
            self._report_drops()

    async def flush(self) -> None:
        """Write everything buffered, a batch at a time. While the database is unavailable the
        batch goes back to the front of the buffer for the next attempt; rows the database
        refuses are dropped and counted."""
        while True:
            with self._lock:
                events = [self._pending.popleft()
                          for _ in range(min(self.batch, len(self._pending)))]
            if not events:
                return
            try:
                await self.rows.insert_events(events)
            except IndexUnavailable as exc:  # kept for the next attempt
                if not self._failing:
                    log.warning("audit: events not written yet, kept for later (%s)",
                                type(exc.__cause__ or exc).__name__)
                self._failing = True
                with self._lock:
                    room = self.capacity - len(self._pending)
                    self.dropped += max(0, len(events) - room)
                    self._pending.extendleft(reversed(events[:room]))
                return
            except Exception as exc:  # rows refused or not encodable: retrying would not help
                log.error("audit: %d events could not be written (%s)", len(events),
                          type(exc.__cause__ or exc).__name__)
                with self._lock:
                    self.dropped += len(events)
                continue
            if self._failing:
                log.info("audit: writing again")
                self._failing = False

    def _report_drops(self) -> None:
        if self.dropped > self._reported_drops:
            log.warning("audit: %d events dropped (buffer full or unwritable); %d in all",
                        self.dropped - self._reported_drops, self.dropped)
            self._reported_drops = self.dropped


@dataclass(frozen=True)
class AuditFilter:
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    event_id: str | None = None  # a DCM code
    action: str | None = None  # C, R, U, D or E
    who: str | None = None
    outcome: int | None = None
    limit: int = 100


class AuditRows:
    """The audit trail's table, over the index's pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @translating
    async def insert_events(self, events: list[AuditEvent]) -> None:
        """Append events in one COPY. A database shutting down is unavailable for the audit, as
        one that is away: the events wait in the buffer for it."""
        try:
            async with self._pool.acquire() as conn:
                await conn.copy_records_to_table(
                    "audit_event", records=[_row(e) for e in events], columns=COLUMNS
                )
        except asyncpg.OperatorInterventionError as exc:
            raise IndexUnavailable(f"the index is shutting down ({type(exc).__name__})") from exc

    @translating
    async def read_events(self, wanted: AuditFilter) -> list[dict[str, Any]]:
        """The latest `limit` events that pass the filter, oldest first."""
        conditions, values = [], []
        for column, operator, value in (
            ("at", ">=", wanted.since), ("at", "<", wanted.until),
            ("event_id", "=", wanted.event_id), ("action", "=", wanted.action),
            ("who", "=", wanted.who), ("outcome", "=", wanted.outcome),
        ):
            if value is not None:
                values.append(value)
                conditions.append(f"{column} {operator} ${len(values)}")
        where = " AND ".join(conditions) or "TRUE"
        values.append(wanted.limit)
        rows = await self._pool.fetch(
            f"SELECT * FROM (SELECT id, {', '.join(COLUMNS)} FROM audit_event WHERE {where} "
            f"ORDER BY at DESC, id DESC LIMIT ${len(values)}) latest ORDER BY at, id",
            *values,
        )
        return [{**dict(r), "detail": orjson.loads(r["detail"])} for r in rows]
