"""The archive's Prometheus metrics (prometheus_client), shared by its server processes.

`serve` runs several processes on the same ports, and a scrape reaches any one of them, so the
metrics live in prometheus_client's multi-process mode: each process writes its values to
memory-mapped files in one directory (`metrics_dir.use`, which must run before this module is
first imported) and a scrape sums them. Without that directory (tools, tests importing the
services) the values stay in this process.

Label values come from fixed sets or from the configuration (a site's name, a route template):
never from a request, so never a UID or anything a client sent.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Awaitable, Iterable
from typing import Protocol, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from ricord_archive.errors import (
    ArchiveError,
    DuplicateRefused,
    InvalidObject,
    ObjectTooLarge,
    RefusedObject,
    StorageUnavailable,
    StudyMismatch,
)

T = TypeVar("T")
CONTENT_TYPE = CONTENT_TYPE_LATEST
PROTOCOLS = ("c_store", "stow_rs")  # the protocol label of ingested objects
SAMPLE_INTERVAL = 1.0  # seconds between samples of the gauges below that are not events
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0)

INGEST_OBJECTS = Counter(
    "ricord_ingest_objects", "Objects received for ingest, by protocol, site and outcome "
    "(stored, duplicate, refused_<reason>, failed)", ["protocol", "site", "outcome"],
)
INGEST_SECONDS = Histogram(
    "ricord_ingest_duration_seconds", "Time from an object's bytes to its ingest outcome",
    ["protocol"], buckets=_LATENCY_BUCKETS,
)
STORED_BYTES = Counter(
    "ricord_ingest_stored_bytes", "Bytes of de-identified objects written to the blob store",
    ["site"],
)
HTTP_REQUESTS = Counter(
    "ricord_http_requests", "DICOMweb requests by service, route template, method and status",
    ["service", "route", "method", "status"],
)
HTTP_SECONDS = Histogram(
    "ricord_http_request_duration_seconds", "DICOMweb request latency, to the last byte sent",
    ["service", "route", "status"], buckets=_LATENCY_BUCKETS,
)
ASSOCIATIONS_OPEN = Gauge(
    "ricord_dimse_associations_open", "DIMSE associations established and not yet closed",
    multiprocess_mode="livesum",
)
ASSOCIATIONS = Counter("ricord_dimse_associations", "DIMSE associations accepted")
ASSOCIATIONS_REJECTED = Counter(
    "ricord_dimse_associations_rejected", "DIMSE associations rejected (A-ASSOCIATE-RJ)",
    ["reason"],
)
DB_POOL_CONNECTIONS = Gauge(
    "ricord_db_pool_connections", "Connections of the index's pools by state (in_use, idle)",
    ["state"], multiprocess_mode="livesum",
)
DB_POOL_MAX = Gauge(
    "ricord_db_pool_max_connections", "Connections the index's pools may open",
    multiprocess_mode="livesum",
)
DB_POOL_WAITS = Counter(
    "ricord_db_pool_waits", "Connection requests that found no idle connection and waited",
)
DB_POOL_WAIT_SECONDS = Histogram(
    "ricord_db_pool_wait_duration_seconds", "Time waited for a database connection",
    buckets=_LATENCY_BUCKETS,
)
BLOB_ERRORS = Counter(
    "ricord_blob_store_errors", "Blob store operations that failed", ["operation"],
)
AUDIT_BUFFERED = Gauge(
    "ricord_audit_events_buffered", "Audit events waiting to be written to the index",
    multiprocess_mode="livesum",
)
AUDIT_DROPPED = Counter(
    "ricord_audit_events_dropped", "Audit events dropped because the buffer was full",
)
REPLICA_IN_USE = Gauge(
    "ricord_read_replica_in_use", "1 when every server process sends its reads to the read "
    "replica, 0 when one falls back to the primary (or no replica is configured)",
    multiprocess_mode="livemin",
)
REPLICA_FALLBACKS = Counter(
    "ricord_read_replica_fallbacks", "Times reads fell back from the replica to the primary",
)
ORPHAN_RUNS = Counter(
    "ricord_orphan_collector_runs", "Orphan collector rounds by result (completed, "
    "skipped: another node held the lock, failed)", ["result"],
)
ORPHANS_REMOVED = Counter(
    "ricord_orphan_collector_removed_blobs",
    "Orphan blobs and partial writes the orphan collector removed",
)

# --- ingest outcomes ------------------------------------------------------------------------

_REASON = re.compile(r"[a-z][a-z0-9_]{0,40}")
_FIXED_REFUSALS: tuple[tuple[type[ArchiveError], str], ...] = (
    (InvalidObject, "invalid_object"), (ObjectTooLarge, "too_large"),
    (DuplicateRefused, "duplicate_conflict"), (StudyMismatch, "study_mismatch"),
)


def outcome_of(exc: BaseException) -> str:
    """The ingest outcome label of a failure: `refused_<reason>` for what the archive will not
    take (a refusal's fixed reason code), `failed` for what may succeed when sent again."""
    if isinstance(exc, StorageUnavailable) or not isinstance(exc, ArchiveError):
        return "failed"
    if isinstance(exc, RefusedObject):
        reason = exc.reason.replace("-", "_").lower()
        return f"refused_{reason}" if _REASON.fullmatch(reason) else "refused_other"
    return next((f"refused_{label}" for kind, label in _FIXED_REFUSALS
                 if isinstance(exc, kind)), "refused_other")


def count_ingest(protocol: str, site: str, outcome: str) -> None:
    INGEST_OBJECTS.labels(protocol, site, outcome).inc()


async def ingesting(protocol: str, site: str, store: Awaitable[T]) -> T:
    """Await ingest's `store(...)`, counting its outcome and timing it; the result or the
    error passes through. `result.duplicate` tells a duplicate from a stored object."""
    started = time.perf_counter()
    try:
        result = await store
    except Exception as exc:
        count_ingest(protocol, site, outcome_of(exc))
        raise
    finally:
        INGEST_SECONDS.labels(protocol).observe(time.perf_counter() - started)
    count_ingest(protocol, site, "duplicate" if getattr(result, "duplicate", False)
                 else "stored")
    return result


def initialize(sites: Iterable[str], rejections: Iterable[str]) -> None:
    """Create the usual series at zero, so that rates and alerts work before the first event:
    each site's stored, duplicate and failed objects per protocol, association rejections,
    blob write errors, orphan collector rounds."""
    for protocol in PROTOCOLS:
        for site in sites:
            for outcome in ("stored", "duplicate", "failed"):
                INGEST_OBJECTS.labels(protocol, site, outcome)
    for reason in rejections:
        ASSOCIATIONS_REJECTED.labels(reason.replace("-", "_"))
    BLOB_ERRORS.labels("write")
    for result in ("completed", "skipped", "failed"):
        ORPHAN_RUNS.labels(result)


# --- exposition -----------------------------------------------------------------------------

def exposition() -> bytes:
    """Every process's metrics in the Prometheus text format (blocking: it reads the files)."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)


# --- gauges sampled in each process -----------------------------------------------------------

class _Pool(Protocol):
    def get_size(self) -> int: ...
    def get_idle_size(self) -> int: ...
    def get_max_size(self) -> int: ...


class _Reads(Protocol):
    @property
    def on_replica(self) -> bool: ...


class _Audit(Protocol):
    dropped: int

    @property
    def buffered(self) -> int: ...


async def sample(pool: _Pool, reads: _Reads, audit: _Audit | None,
                 interval: float = SAMPLE_INTERVAL) -> None:
    """Keep this process's gauges current (every `interval` seconds, until cancelled): its
    database pool, whether its reads go to the replica, its audit buffer and drops."""
    DB_POOL_MAX.set(pool.get_max_size())
    reported_drops = 0
    while True:
        size, idle = pool.get_size(), pool.get_idle_size()
        DB_POOL_CONNECTIONS.labels("in_use").set(size - idle)
        DB_POOL_CONNECTIONS.labels("idle").set(idle)
        REPLICA_IN_USE.set(1 if reads.on_replica else 0)
        if audit is not None:
            AUDIT_BUFFERED.set(audit.buffered)
            AUDIT_DROPPED.inc(audit.dropped - reported_drops)
            reported_drops = audit.dropped
        await asyncio.sleep(interval)
