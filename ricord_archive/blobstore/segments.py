"""Segment files: many blobs in one pre-allocated file, each made durable by one `fdatasync`.

A segment is `<blobs>/segments/<id>.seg` (`id`: 32 hex digits, fresh for every segment, so
no process ever appends to another's segment or to one of an earlier life):

    page 0      superblock: magic, version, slot count, where data starts, capacity, CRC
    page 1...   slot table: one 64-byte slot per key, written once the blob's bytes are
    data        the blobs' bytes, appended

The key `s/<id>/<n>` names slot n. `new_key()` reserves a slot (the length is not known yet);
`write()` appends the bytes at the segment's tail, then the slot (magic, version, kind, state,
the key's segment id and slot number, offset, length, write time, CRC-32 of the bytes, CRC-32
of the slot), then one `fdatasync` shared by every writer waiting on that segment (group
flush). Space is reserved ahead of the writers (`posix_fallocate`) and fsynced (file and folder)
by a background thread: a writer's `fdatasync` then flushes its bytes and the conversion of the
reserved extents it wrote, never a new file, name or size. Reserved space reads as zeros.
While the blobs written lately are small, the thread also writes the zeros (`segment_writer`):
a small blob's flush then commits no extent conversion (0.12 against 0.21 ms for 10 KB). For
large blobs that would write every byte twice where ingest is bound by the disk's bandwidth
(197 against 253 inst/s for 512² CT on one association, bench/RESULTS.md). Where
the file system allows, the bytes are written with direct I/O (`direct`), each blob starting
on a page and padded to whole pages (its slot keeps its true length); a delete then frees
every whole page of a blob, the last partial one with the segment.

A blob that does not fit in what is left of its segment is a file of its own,
`<id>-<n>.dcm`, written the old way (temporary file, fsync, rename, folder fsync); its slot
says so. A delete marks the slot deleted (a byte outside the slot's CRC) and punches a hole
over the bytes; a segment with no live slot that no process holds (the owner keeps an
exclusive `flock` while it may append) is removed by fsck and the orphan collector.
Reading, listing and deleting are here; appending is `segment_writer`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import io
import os
import re
import struct
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

from ricord_archive.blobstore.ranged import RangedFile

KEY = re.compile(r"^s/([0-9a-f]{32})/(0|[1-9][0-9]{0,8})$")
_NAME = re.compile(r"^([0-9a-f]{32})\.seg$")

_PAGE = 4096
_SUPER = struct.Struct("<8sHHIQQ")  # magic, version, flags, slots, data start, capacity
_SUPER_MAGIC = b"RICORDSG"
_SLOT = struct.Struct("<4sBBBx16sIQQQI")  # + CRC-32 of these bytes with the state byte 0
_SLOT_SIZE = 64
_SLOT_MAGIC = b"RBLB"
_VERSION = 1
_STATE_AT = 6  # the state byte: 0 live, 1 deleted (not covered by the slot's CRC)
_LIVE, _DELETED = 0, 1
INLINE, EXTERNAL = 1, 2
_SCAN = 1024  # slots read at a time; a zeroed run this long ends the table (see MAX_PENDING)
# Slots handed out and not yet written (reserved, or being written) in one segment: never
# more (the next key goes to the next segment), so fewer than _SCAN zeroed slots precede a
# written one, even after a crash.
MAX_PENDING = 512


class Slot(NamedTuple):
    segment: str
    index: int  # type: ignore[assignment]  # the slot's number; hides tuple.index, unused here
    kind: int
    offset: int
    length: int
    written: float  # seconds since the epoch
    crc: int  # CRC-32 of the blob's bytes
    live: bool


class Location(NamedTuple):
    """Where a blob's bytes are on the local filesystem: a file and the first byte's offset."""

    path: Path
    offset: int


def parse_key(key: str) -> tuple[str, int] | None:
    found = KEY.fullmatch(key)
    return (found.group(1), int(found.group(2))) if found else None


def slot_bytes(slot: Slot) -> bytes:
    body = _SLOT.pack(_SLOT_MAGIC, _VERSION, slot.kind, _LIVE, bytes.fromhex(slot.segment),
                      slot.index, slot.offset, slot.length, int(slot.written * 1e9), slot.crc)
    return (body + struct.pack("<I", zlib.crc32(body))).ljust(_SLOT_SIZE, b"\0")


def _decode_slot(raw: bytes) -> Slot | None:
    """The slot, or None for zeros, a torn write or anything that is not a slot."""
    if len(raw) < _SLOT.size + 4 or raw[:4] != _SLOT_MAGIC:
        return None
    body = bytearray(raw[:_SLOT.size])
    state, body[_STATE_AT] = body[_STATE_AT], _LIVE
    (crc,) = struct.unpack_from("<I", raw, _SLOT.size)
    if zlib.crc32(body) != crc or state not in (_LIVE, _DELETED):
        return None
    _, version, kind, _, segment, index, offset, length, written, data_crc = _SLOT.unpack(body)
    if version != _VERSION or kind not in (INLINE, EXTERNAL):
        return None
    return Slot(segment.hex(), index, kind, offset, length, written / 1e9, data_crc,
                state == _LIVE)


def superblock(slots: int, data_start: int, capacity: int) -> bytes:
    body = _SUPER.pack(_SUPER_MAGIC, _VERSION, 0, slots, data_start, capacity)
    return body + struct.pack("<I", zlib.crc32(body))


def _read_superblock(fd: int) -> tuple[int, int, int]:
    """(slots, data start, capacity); OSError when the file is not a segment."""
    raw = os.pread(fd, _SUPER.size + 4, 0)
    if len(raw) == _SUPER.size + 4 and zlib.crc32(raw[:_SUPER.size]) == struct.unpack_from(
            "<I", raw, _SUPER.size)[0]:
        magic, version, _, slots, data_start, capacity = _SUPER.unpack_from(raw)
        if magic == _SUPER_MAGIC and version == _VERSION:
            return slots, data_start, capacity
    raise OSError("not a blob segment")


def slot_position(index: int) -> int:
    return _PAGE + index * _SLOT_SIZE


def layout(capacity: int) -> tuple[int, int]:
    """(slots, data start) of a segment of `capacity` bytes: one slot per 4 KiB of data."""
    slots = max(64, capacity // _PAGE)
    return slots, _PAGE + -(-slots * _SLOT_SIZE // _PAGE) * _PAGE


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def reserve(fd: int, start: int, end: int) -> None:
    """Allocate [start, end) of the file (it reads as zeros) without writing it."""
    if end > start:
        os.posix_fallocate(fd, start, end - start)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(final: Path, tmp: Path, data: bytes) -> None:
    """The old durable write: a temporary file, fsync, rename into place, fsync the folder."""
    part = tmp / f"{uuid.uuid4().hex}.part"
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        pwrite_all(fd, data, 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        part.unlink(missing_ok=True)
        raise
    os.close(fd)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.rename(part, final)
    fsync_dir(final.parent)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_FALLOC_PUNCH_HOLE = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE (Linux)


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Give the blocks under [offset, offset+length) back to the filesystem (Linux); False
    where the filesystem cannot (the space returns when the segment is removed)."""
    fallocate = getattr(_libc, "fallocate", None)
    if fallocate is None or length <= 0:
        return False
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    return fallocate(fd, _FALLOC_PUNCH_HOLE, offset, length) == 0


class SegmentFiles:
    """Reading, listing, deleting and removing segment blobs: any process, no state."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, segment: str) -> Path:
        return self.folder / f"{segment}.seg"

    def external(self, segment: str, index: int) -> Path:
        return self.folder / f"{segment}-{index}.dcm"

    def slot(self, fd: int, segment: str, index: int) -> Slot | None:
        slots, _, _ = _read_superblock(fd)
        if index >= slots:
            return None
        found = _decode_slot(os.pread(fd, _SLOT_SIZE, slot_position(index)))
        if found is None or (found.segment, found.index) != (segment, index):
            return None
        return found

    def _live(self, key: str) -> tuple[Slot, int]:
        """The key's live slot and an open descriptor of its segment (the caller closes it)."""
        segment, index = parse_key(key) or (None, 0)
        if segment is None:
            raise ValueError("not a blob key of this archive")
        fd = os.open(self.path(segment), os.O_RDONLY | os.O_CLOEXEC)
        try:
            found = self.slot(fd, segment, index)
        except BaseException:
            os.close(fd)
            raise
        if found is None or not found.live:
            os.close(fd)
            raise FileNotFoundError("no such blob")
        return found, fd

    def open(self, key: str) -> BinaryIO:
        found, fd = self._live(key)
        if found.kind == EXTERNAL:
            os.close(fd)
            return self.external(found.segment, found.index).open("rb")
        raw = _Slice(fd, found.offset, found.length, found.crc, key)
        return io.BufferedReader(raw, buffer_size=64 * 1024)

    def location(self, key: str) -> Location:
        found, fd = self._live(key)
        os.close(fd)
        if found.kind == EXTERNAL:
            return Location(self.external(found.segment, found.index), 0)
        return Location(self.path(found.segment), found.offset)

    def delete(self, key: str) -> None:
        """Mark the slot deleted and free the bytes; nothing when the blob is not there."""
        segment, index = parse_key(key) or (None, 0)
        if segment is None:
            raise ValueError("not a blob key of this archive")
        try:
            fd = os.open(self.path(segment), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            found = self.slot(fd, segment, index)
            if found is None or not found.live:
                return
            os.pwrite(fd, bytes([_DELETED]), slot_position(index) + _STATE_AT)
            if found.kind == INLINE:
                punch_hole(fd, found.offset, found.length)
            else:
                self.external(segment, index).unlink(missing_ok=True)
        finally:
            os.close(fd)

    def names(self) -> Iterator[str]:
        for path in sorted(self.folder.glob("*.seg")):
            if _NAME.fullmatch(path.name):
                yield path.name[:32]

    def slots(self, segment: str) -> Iterator[Slot]:
        """The valid slots of a segment (live and deleted), in order."""
        with contextlib.suppress(FileNotFoundError):
            fd = os.open(self.path(segment), os.O_RDONLY | os.O_CLOEXEC)
            try:
                yield from self._scan(fd, segment)
            finally:
                os.close(fd)

    @staticmethod
    def _scan(fd: int, segment: str) -> Iterator[Slot]:
        try:
            slots, _, _ = _read_superblock(fd)
        except OSError:
            return  # not a segment, or one whose superblock never became durable
        for first in range(0, slots, _SCAN):
            count = min(_SCAN, slots - first)
            table = os.pread(fd, count * _SLOT_SIZE, _PAGE + first * _SLOT_SIZE)
            if not table.strip(b"\0"):
                return  # no slot after a zeroed run this long (see MAX_PENDING)
            for at in range(0, len(table), _SLOT_SIZE):
                found = _decode_slot(table[at:at + _SLOT_SIZE])
                if found is not None and (found.segment, found.index) == (
                        segment, first + at // _SLOT_SIZE):
                    yield found

    def walk(self) -> Iterator[tuple[str, int, float]]:
        """(key, size, time written) of every live blob. The time is the older of the slot's
        and the segment file's modification time (a file aged on purpose ages its blobs); a
        blob whose bytes are not (all) there has the size that is."""
        for segment in self.names():
            path = self.path(segment)
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            for found in self.slots(segment):
                if not found.live:
                    continue
                key = f"s/{segment}/{found.index}"
                size = max(0, min(found.length, stat.st_size - found.offset))
                if found.kind == EXTERNAL:
                    try:
                        size = self.external(segment, found.index).stat().st_size
                    except FileNotFoundError:
                        continue
                yield key, size, min(found.written, stat.st_mtime)

    def unused(self) -> Iterator[tuple[str, float]]:
        """(name, modification time) of segments without a live blob that no process holds."""
        for segment in self.names():
            path = self.path(segment)
            with contextlib.suppress(FileNotFoundError), self._held(path, fcntl.LOCK_SH) as fd:
                if fd is not None and not any(s.live for s in self._scan(fd, segment)):
                    yield f"segments/{path.name}", os.fstat(fd).st_mtime

    def remove(self, name: str) -> None:
        """Remove an unused segment (`segments/<id>.seg` from `unused`) when it still is."""
        found = re.fullmatch(r"segments/([0-9a-f]{32})\.seg", name)
        if not found:
            raise ValueError("not a segment name")
        segment, path = found.group(1), self.path(found.group(1))
        with contextlib.suppress(FileNotFoundError), self._held(path, fcntl.LOCK_EX) as fd:
            if fd is None or any(s.live for s in self._scan(fd, segment)):
                return
            for external in self.folder.glob(f"{segment}-*.dcm"):
                external.unlink()  # the files of deleted slots a crash left behind
            path.unlink()
            fsync_dir(self.folder)

    @staticmethod
    @contextlib.contextmanager
    def _held(path: Path, mode: int) -> Iterator[int | None]:
        """An open descriptor of `path` locked with `mode`, or None while a writer holds it."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None
                return
            yield fd
        finally:
            os.close(fd)


class _Slice(RangedFile):
    """One blob's bytes in a segment as a seekable read-only file (offset 0: its first byte).
    Reading it whole from the start checks the bytes' CRC-32 (OSError when they differ)."""

    def __init__(self, fd: int, base: int, length: int, crc: int, key: str) -> None:
        super().__init__(key, length)
        self._fd, self._base, self._crc = fd, base, crc

    def readall(self) -> bytes:
        whole = self._position == 0
        data = super().readall()
        if whole and zlib.crc32(data) != self._crc:
            raise OSError("a blob's bytes differ from their checksum")
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        """Straight into the caller's buffer (a 10 MB frame is not copied twice)."""
        view = memoryview(buffer).cast("B")[: max(0, self._size - self._position)]
        at, done = self._base + self._position, 0
        while done < len(view):
            read = os.preadv(self._fd, [view[done:]], at + done)
            if not read:
                raise OSError("a blob's segment is shorter than its slot says")
            done += read
        self._position += done
        return done

    def _read(self, start: int, length: int) -> bytes:
        parts, at = [], self._base + start
        while length > 0:
            chunk = os.pread(self._fd, length, at)
            if not chunk:
                raise OSError("a blob's segment is shorter than its slot says")
            parts.append(chunk)
            at, length = at + len(chunk), length - len(chunk)
        return b"".join(parts)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()
