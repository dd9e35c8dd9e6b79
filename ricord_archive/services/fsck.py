"""Consistency of the blob store and the index: orphan blobs (written, never committed: a
crash between the blob and the index transaction leaves them), rows whose blob is missing or
of the wrong size (which must never happen), partial writes, and segment files whose blobs
were all deleted (removed with the partial writes).

Blobs younger than a grace period are not orphans yet: a running archive may be about to
commit them. So `--repair` is safe while archives are running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from ricord_archive.blobstore import BlobStore, FileBlobStore
from ricord_archive.errors import IndexFailure
from ricord_archive.index.facade import Index
from ricord_archive.runtime import metrics

log = logging.getLogger(__name__)

GRACE_SECONDS = 3600.0


@dataclass
class FsckReport:
    orphan_blobs: list[str] = field(default_factory=list)  # blob keys no row names
    missing_blobs: list[str] = field(default_factory=list)  # SOP Instance UIDs (de-identified)
    wrong_size: list[str] = field(default_factory=list)  # SOP Instance UIDs (de-identified)
    partial_writes: list[str] = field(default_factory=list)  # temporary files, unused segments
    indexed: int = 0

    @property
    def clean(self) -> bool:
        return not (self.orphan_blobs or self.missing_blobs or self.wrong_size
                    or self.partial_writes)

    def lines(self) -> list[str]:
        return [
            f"indexed instances: {self.indexed}",
            f"orphan blobs (no index row): {len(self.orphan_blobs)}",
            f"index rows whose blob is missing: {len(self.missing_blobs)}",
            f"index rows whose blob has the wrong size: {len(self.wrong_size)}",
            f"partial writes and unused segments: {len(self.partial_writes)}",
        ] + [f"missing: {uid}" for uid in self.missing_blobs] + [
            f"wrong size: {uid}" for uid in self.wrong_size
        ]


def _scan(blobs: BlobStore, now: float, grace: float) -> tuple[dict[str, int], list[str], list]:
    on_disk, young = {}, []
    for key, size, mtime in blobs.walk():
        on_disk[key] = size
        if now - mtime < grace:
            young.append(key)
    partial: list[str] = []  # an object store leaves no temporary files
    if isinstance(blobs, FileBlobStore):
        partial = [name for name, mtime in blobs.temporary_files() if now - mtime >= grace]
    return on_disk, young, partial


async def check(index: Index, blobs: BlobStore, grace: float = GRACE_SECONDS) -> FsckReport:
    """Compare every index row with the blob store (one pass over each)."""
    on_disk, young, partial = await asyncio.to_thread(_scan, blobs, time.time(), grace)
    report = FsckReport(partial_writes=partial)
    async for sop_uid, blob_key, size_bytes in index.instance_blobs():
        report.indexed += 1
        size = on_disk.pop(blob_key, None)
        if size is None:
            report.missing_blobs.append(sop_uid)
        elif size != size_bytes:
            report.wrong_size.append(sop_uid)
    recent = set(young)
    report.orphan_blobs = sorted(key for key in on_disk if key not in recent)
    return report


async def repair(blobs: BlobStore, report: FsckReport) -> int:
    """Delete orphan blobs and partial writes; rows with missing blobs are only reported
    (their objects must be sent again). Returns how many files were removed."""

    def remove() -> int:
        for key in report.orphan_blobs:
            blobs.delete(key)
        if isinstance(blobs, FileBlobStore):
            for name in report.partial_writes:
                blobs.remove_temporary(name)
        return len(report.orphan_blobs) + len(report.partial_writes)

    return await asyncio.to_thread(remove)


async def report_at_start(index: Index, blobs: BlobStore) -> None:
    """The start-up check, in report mode: counts in the log, nothing changed."""
    try:
        report = await check(index, blobs)
    except IndexFailure as exc:
        log.warning("fsck at start-up could not run: %s", type(exc).__name__)
        return
    if report.clean:
        log.info("fsck: %d instances, blob store and index agree", report.indexed)
    else:
        log.warning("fsck: %s (run 'ricord-archive fsck --repair' to remove orphans)",
                    "; ".join(report.lines()[1:5]))


# One collector at a time across every node and process sharing the index.
_COLLECTOR_LOCK = 0x52494F52  # pg_advisory_lock key: "RIOR"


async def collect_orphans(index: Index, blobs: BlobStore, interval: float,
                          grace: float) -> None:
    """Every `interval` seconds, remove orphan blobs and partial writes older than `grace`
    (left by crashes between a blob and its index transaction), in whichever node first takes
    the collector's advisory lock; the others skip that round."""
    while True:
        await asyncio.sleep(interval)
        try:
            async with index.advisory_lock(_COLLECTOR_LOCK) as locked:
                if not locked:
                    metrics.ORPHAN_RUNS.labels("skipped").inc()
                    continue
                report = await check(index, blobs, grace)
                removed = await repair(blobs, report)
        except IndexFailure as exc:
            metrics.ORPHAN_RUNS.labels("failed").inc()
            log.warning("orphan collector could not run: %s", type(exc).__name__)
            continue
        metrics.ORPHAN_RUNS.labels("completed").inc()
        metrics.ORPHANS_REMOVED.inc(removed)
        if removed:
            log.info("orphan collector removed %d orphan blobs and partial writes", removed)
        if report.missing_blobs or report.wrong_size:
            log.error("orphan collector: %s", "; ".join(report.lines()[2:4]))
