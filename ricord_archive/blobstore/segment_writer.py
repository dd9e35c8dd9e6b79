"""The appending side of the segment blob store (`segments`), one per process: hands out
slots, appends, flushes in groups, and keeps (in a background thread) the current segment
reserved ahead of its writers and the next one ready."""

from __future__ import annotations

import fcntl
import os
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from ricord_archive.blobstore.direct import aligned, open_direct, write_direct, zero_direct
from ricord_archive.blobstore.segments import (
    EXTERNAL,
    INLINE,
    MAX_PENDING,
    SegmentFiles,
    Slot,
    fsync_dir,
    layout,
    parse_key,
    pwrite_all,
    reserve,
    slot_bytes,
    slot_position,
    superblock,
    write_file,
)

_WINDOW = 16 * 1024**2  # bytes reserved (and fsynced) at a time, ahead of the writers
_FIRST_WINDOW = 1024**2  # reserved when a segment is made (a process's first key waits for it)
# Reserved space is written with zeros ahead of the writers while the blobs written lately
# average less than this (`_reserve`).
ZERO_BELOW = 64 * 1024
ZERO_STEP = 2 * 1024**2  # bytes zeroed (and fsynced) at a time
QUICK_BYTES = 64 * 1024  # a direct write of at most this much is `quick`
MIN_SEGMENT_BYTES = 1024**2


@dataclass(eq=False)
class _Open:
    """A segment this process appends to."""

    id: str
    fd: int
    slots: int
    data_start: int
    capacity: int
    ready: int  # bytes reserved and fsynced
    tail: int  # where the next blob's bytes go
    next_slot: int = 0
    reserved: set[int] = field(default_factory=set)  # slots handed out, not yet written
    writing: int = 0
    ticket: int = 0  # writes whose bytes are in the file, waiting for a flush
    flushed: int = 0
    flushing: bool = False
    failed: int = 0  # tickets up to this one were in a flush that failed
    filled: bool = False  # a blob did not fit
    retired: bool = False  # no more keys: the next segment took over
    direct: int | None = None  # the same file opened for direct I/O (None: not supported)

    def close(self) -> None:
        if self.direct is not None:
            os.close(self.direct)
        os.close(self.fd)  # releases the flock: the segment may be removed once emptied

    def usable(self) -> bool:
        """Whether a key may still be handed out here."""
        return (not self.retired and not self.failed and self.next_slot < self.slots
                and len(self.reserved) + self.writing < MAX_PENDING)

    def full(self, margin: int) -> bool:
        """Whether the next key should go to the next segment."""
        return not self.usable() or self.filled or self.capacity - self.tail < margin


class SegmentWriter:
    """The appending side, one per process: reserves slots, appends, flushes in groups, and
    keeps (in a background thread) the current segment reserved ahead and the next one ready."""

    def __init__(self, files: SegmentFiles, tmp: Path, capacity: int) -> None:
        if capacity < MIN_SEGMENT_BYTES:
            raise ValueError(f"a blob segment has at least {MIN_SEGMENT_BYTES} bytes")
        self.files, self.tmp, self.capacity = files, tmp, capacity
        self.window = min(_WINDOW, capacity)
        self._cond = threading.Condition()
        self._current: _Open | None = None
        self._spare: _Open | None = None
        self._open: dict[str, _Open] = {}
        self._thread: threading.Thread | None = None
        self._error: OSError | None = None
        self._closed = False
        self._busy = False  # the preparer is reserving
        self._blob_size = 0.0  # a moving average of the blobs' sizes (`_reserve`)

    def new_key(self) -> str | None:
        """A key naming a slot; None when no segment can take one (the preparer is behind or
        failing): the caller then makes the key of a file of its own. Waits only for the
        process's first segment (a few milliseconds, once)."""
        with self._cond:
            self._start()
            current = self._current
            if current is None or (current.full(self.capacity // 32) and (
                    self._spare is not None or not current.usable())):
                while (current is None and self._spare is None and self._error is None
                       and not self._closed):
                    self._cond.wait(1.0)
                if self._spare is None:
                    return None
                current = self._rotate(self._spare)
            index = current.next_slot
            current.next_slot += 1
            current.reserved.add(index)
            return f"s/{current.id}/{index}"

    def quick(self, key: str, size: int) -> bool:
        """Whether writing `size` bytes under `key` is a small direct write into space already
        reserved: with its flush about a tenth of a millisecond (bench/RESULTS.md), less than
        handing it to a thread and back costs."""
        segment, _ = parse_key(key) or ("", 0)
        with self._cond:
            seg = self._open.get(segment)
            return (size <= QUICK_BYTES and seg is not None and seg.direct is not None
                    and seg.ready - seg.tail >= aligned(size))

    def write(self, key: str, data: bytes) -> None:
        segment, index = parse_key(key) or ("", 0)
        with self._cond:
            seg = self._open.get(segment)
            if seg is None or index not in seg.reserved:
                raise ValueError("not a key this blob store handed out for writing")
            seg.reserved.discard(index)
            seg.writing += 1
            size = len(data) if seg.direct is None else aligned(len(data))
            offset = seg.tail if seg.tail + size <= seg.capacity else None
            if offset is None:
                seg.filled = True  # the next key goes to the next segment
            else:
                seg.tail += size
                self._blob_size += (size - self._blob_size) / 16
                self._cond.notify_all()  # the preparer reserves further ahead
                while seg.ready < offset + size:
                    if self._error is not None or self._closed:
                        seg.writing -= 1
                        self._release_if_done(seg)
                        self._raise_error()
                    self._cond.wait(1.0)
        try:
            if offset is None:  # too large for what is left: a file of its own
                write_file(self.files.external(segment, index), self.tmp, data)
            elif seg.direct is not None:
                write_direct(seg.direct, data, offset)
            else:
                pwrite_all(seg.fd, data, offset)
            slot = Slot(segment, index, INLINE if offset is not None else EXTERNAL,
                        offset or 0, len(data), time.time(), zlib.crc32(data), True)
            os.pwrite(seg.fd, slot_bytes(slot), slot_position(index))
            self._flush(seg)
        finally:
            with self._cond:
                seg.writing -= 1
                self._release_if_done(seg)

    def _flush(self, seg: _Open) -> None:
        """fdatasync once for every write whose bytes are in the file by then (group flush)."""
        with self._cond:
            seg.ticket += 1
            mine = seg.ticket
            while seg.flushed < mine:
                if mine <= seg.failed:
                    raise OSError("flushing a blob segment failed")
                if seg.flushing:
                    self._cond.wait()
                    continue
                seg.flushing, target = True, seg.ticket
                self._cond.release()
                try:
                    os.fdatasync(seg.fd)
                except OSError:  # never retried: after a failed flush the data may be lost
                    with self._cond:
                        seg.failed, seg.flushing = target, False
                        self._cond.notify_all()
                    raise
                finally:
                    self._cond.acquire()
                seg.flushed, seg.flushing = target, False
                self._cond.notify_all()

    def _rotate(self, spare: _Open) -> _Open:
        """The spare becomes the current segment; the old one is closed once its writes are
        done."""
        if self._current is not None:
            self._current.retired = True
            self._release_if_done(self._current)
        self._current, self._spare = spare, None
        self._cond.notify_all()
        return spare

    def _release_if_done(self, seg: _Open) -> None:
        if seg.retired and not seg.writing and not seg.reserved and seg.id in self._open:
            del self._open[seg.id]
            seg.close()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise OSError(f"cannot prepare a blob segment ({type(self._error).__name__})")
        if self._closed:
            raise OSError("the blob store is closed")

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._prepare, name="blob-segments",
                                            daemon=True)
            self._thread.start()

    def settle(self) -> None:
        """Wait until the preparer has nothing left to do (benchmarks)."""
        with self._cond:
            self._start()
            while self._busy or self._job() is not False:
                self._raise_error()
                self._cond.wait(1.0)

    def close(self) -> None:
        """Stop the preparer and close every segment (writes in progress must be over)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._cond:
            for seg in list(self._open.values()):
                seg.close()
            self._open.clear()
            self._current = self._spare = None

    # the preparer (a background thread)

    def _job(self) -> _Open | bool:
        """The segment to reserve further, True to create the next one, False: nothing to do.
        In this order: a segment a writer waits for; the current one when less than a window
        is reserved ahead of its tail; creating the next one; the rest of the next one once the
        current one is half used. So a process that writes little reserves little, and every
        segment but a process's first is wholly reserved before use: no fdatasync of a writer
        has to commit the allocation or the size of its file."""
        for seg in self._open.values():
            if seg.ready < seg.tail:  # a writer waits for it (even in a retired segment)
                return seg
        current, spare = self._current, self._spare
        if current is not None and current.ready < current.capacity and not current.retired \
                and current.ready - current.tail < self.window:
            return current
        if spare is None:
            return True
        if spare.ready < spare.capacity and (current is None or 2 * (
                current.tail - current.data_start) >= current.capacity - current.data_start):
            return spare
        return False

    def _prepare(self) -> None:
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                while not self._closed and (job := self._job()) is False:
                    self._cond.wait()
                if self._closed:
                    return
                self._busy = True
            try:
                if isinstance(job, _Open):
                    self._extend(job)
                else:
                    spare = self._create()
                    with self._cond:
                        self._spare, self._error = spare, None
            except OSError as exc:
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                    self._cond.wait(1.0)  # then try again (space may have been freed)
                continue
            with self._cond:
                self._cond.notify_all()

    def _extend(self, seg: _Open) -> None:
        small = self._blob_size < ZERO_BELOW
        # zeroing goes in short steps: a writer waiting for space waits for one step only
        end = min(seg.capacity, seg.ready + (min(ZERO_STEP, self.window) if small
                                             else self.window))
        _reserve(seg.fd, seg.direct if small else None, seg.ready, end)
        os.fsync(seg.fd)  # the new extents and size: their journal commit is ours, not a writer's
        with self._cond:
            seg.ready, self._error = end, None

    def _create(self) -> _Open:
        self.files.folder.mkdir(parents=True, exist_ok=True)
        segment = uuid.uuid4().hex
        path = self.files.path(segment)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        direct = None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            direct = open_direct(path)
            slots, data_start = layout(self.capacity)
            ready = min(self.capacity, data_start + _FIRST_WINDOW)  # then reserved further
            if ready <= data_start:
                raise OSError("a blob segment too small for its slot table")
            _reserve(fd, direct, 0, ready)
            pwrite_all(fd, superblock(slots, data_start, self.capacity), 0)
            os.fsync(fd)
            fsync_dir(self.files.folder)
        except BaseException:
            if direct is not None:
                os.close(direct)
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        seg = _Open(segment, fd, slots, data_start, self.capacity, ready, data_start,
                    direct=direct)
        with self._cond:
            self._open[segment] = seg
        return seg


def _reserve(fd: int, direct: int | None, start: int, end: int) -> None:
    """Reserve [start, end) of a segment; with a direct I/O descriptor, also write zeros over
    it, so that a writer's `fdatasync` flushes its data and slot only, not the conversion of
    the unwritten extents it wrote: for a 10 KB blob and its slot, 0.12 against 0.21 ms here.
    For large blobs that saving is small and zeroing writes every byte twice, where ingest is
    bound by the disk's bandwidth (bench/RESULTS.md), hence `ZERO_BELOW`."""
    reserve(fd, start, end)
    if direct is not None:
        zero_direct(direct, start, end)
