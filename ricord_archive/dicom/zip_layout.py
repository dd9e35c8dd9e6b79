"""The byte layout of a streamed ZIP64 archive of stored (not deflated) entries. Pure: no I/O.

Every size is known up front, so the total length is too (an exact Content-Length), and any
byte range maps to its parts: headers and the central directory rendered here, entry data read
by the caller. An entry whose CRC-32 is known up front carries it in its local header; one whose
CRC is not (`crc=None`) gets a data descriptor after its data, and its CRC is asked for only
when the descriptor or the central directory is rendered, i.e. after its data went out, so a
sequential stream computes it on the way. Every entry carries ZIP64 sizes (APPNOTE 4.5.3), so
entries of any size and any number of entries are fine.
"""

from __future__ import annotations

import datetime as dt
import struct
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

_VERSION = 45  # ZIP64
_MADE_BY = (3 << 8) | _VERSION  # Unix, so the external attributes are a file mode
_UTF8 = 1 << 11
_DESCRIPTOR_FLAG = 1 << 3
_MODE = (0o100644 << 16)
_FULL32, _FULL16 = 0xFFFFFFFF, 0xFFFF
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_LOCAL_EXTRA = struct.Struct("<HHQQ")
_DESCRIPTOR = struct.Struct("<IIQQ")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_CENTRAL_EXTRA = struct.Struct("<HHQQQ")
_END64 = struct.Struct("<IQHHIIQQQQ")
_LOCATOR = struct.Struct("<IIQI")
_END = struct.Struct("<IHHHHIIH")
_END_SIZE = _END64.size + _LOCATOR.size + _END.size


@dataclass(frozen=True)
class Entry:
    name: str  # a relative path with forward slashes
    size: int
    crc: int | None = None  # None: not known up front (a data descriptor follows the data)


@dataclass(frozen=True)
class DataSlice:
    """`length` bytes of entry `index`'s data, from `offset` within it."""

    index: int
    offset: int
    length: int


def dos_time(when: dt.datetime) -> tuple[int, int]:
    """(time, date) in MS-DOS format; dates before 1980 become 1980-01-01."""
    if when.year < 1980:
        return 0, (1 << 5) | 1
    return ((when.hour << 11) | (when.minute << 5) | (when.second // 2),
            ((when.year - 1980) << 9) | (when.month << 5) | when.day)


class ZipLayout:
    """Where each part of the archive lies: for entry i, its local header, its data, its data
    descriptor (only when its CRC is not known up front); then a central directory record per
    entry; then the ZIP64 end records."""

    def __init__(self, entries: Sequence[Entry], modified: dt.datetime) -> None:
        self.entries = entries
        self._time, self._date = dos_time(modified)
        self._names = [e.name.encode("utf-8") for e in entries]
        self.local_offsets: list[int] = []
        position = 0
        for entry, name in zip(entries, self._names, strict=True):
            self.local_offsets.append(position)
            position += self._local_size(name) + entry.size + self._descriptor_size(entry)
        self.central_offset = position
        self.central_offsets: list[int] = []
        for name in self._names:
            self.central_offsets.append(position)
            position += _CENTRAL.size + len(name) + _CENTRAL_EXTRA.size
        self.end_offset = position
        self.size = position + _END_SIZE

    @staticmethod
    def _local_size(name: bytes) -> int:
        return _LOCAL.size + len(name) + _LOCAL_EXTRA.size

    @staticmethod
    def _descriptor_size(entry: Entry) -> int:
        return 0 if entry.crc is not None else _DESCRIPTOR.size

    def data_offset(self, index: int) -> int:
        """Where entry `index`'s data starts in the archive."""
        return self.local_offsets[index] + self._local_size(self._names[index])

    def _flags(self, entry: Entry) -> int:
        return _UTF8 | (_DESCRIPTOR_FLAG if entry.crc is None else 0)

    def local_header(self, index: int) -> bytes:
        entry, name = self.entries[index], self._names[index]
        return _LOCAL.pack(
            0x04034B50, _VERSION, self._flags(entry), 0, self._time, self._date,
            entry.crc or 0, _FULL32, _FULL32, len(name), _LOCAL_EXTRA.size,
        ) + name + _LOCAL_EXTRA.pack(1, 16, entry.size, entry.size)

    def descriptor(self, index: int, crc: int) -> bytes:
        size = self.entries[index].size
        return _DESCRIPTOR.pack(0x08074B50, crc, size, size)

    def central_record(self, index: int, crc: int) -> bytes:
        entry, name = self.entries[index], self._names[index]
        return _CENTRAL.pack(
            0x02014B50, _MADE_BY, _VERSION, self._flags(entry), 0, self._time, self._date,
            crc, _FULL32, _FULL32, len(name), _CENTRAL_EXTRA.size, 0, 0, 0, _MODE, _FULL32,
        ) + name + _CENTRAL_EXTRA.pack(1, 24, entry.size, entry.size, self.local_offsets[index])

    def end_records(self) -> bytes:
        count, central_size = len(self.entries), self.end_offset - self.central_offset
        return (
            _END64.pack(0x06064B50, _END64.size - 12, _MADE_BY, _VERSION, 0, 0, count, count,
                        central_size, self.central_offset)
            + _LOCATOR.pack(0x07064B50, 0, self.end_offset, 1)
            + _END.pack(0x06054B50, 0, 0, _FULL16, _FULL16, _FULL32, _FULL32, 0)
        )

    def _parts(self, start: int, crc_of: Callable[[int], int]
               ) -> Iterator[tuple[int, int, bytes | DataSlice]]:
        """(offset, length, content) of each part from the one holding `start` on; literal
        parts are rendered only when reached."""
        if start < self.central_offset:
            first = bisect_right(self.local_offsets, start) - 1
            for index in range(first, len(self.entries)):
                entry = self.entries[index]
                header = self.local_header(index)
                yield self.local_offsets[index], len(header), header
                data = self.data_offset(index)
                yield data, entry.size, DataSlice(index, 0, entry.size)
                if entry.crc is None:
                    yield data + entry.size, _DESCRIPTOR.size, self.descriptor(
                        index, crc_of(index))
        if start < self.end_offset:
            first = max(0, bisect_right(self.central_offsets, start) - 1)
            for index in range(first, len(self.entries)):
                entry = self.entries[index]
                record = self.central_record(
                    index, entry.crc if entry.crc is not None else crc_of(index))
                yield self.central_offsets[index], len(record), record
        yield self.end_offset, _END_SIZE, self.end_records()

    def slices(self, start: int, stop: int, crc_of: Callable[[int], int] | None = None
               ) -> Iterator[bytes | DataSlice]:
        """The bytes [start, stop) of the archive as literal bytes and entry data slices, in
        order. `crc_of(i)` gives the CRC of an entry not known up front; it is called only
        after every byte of that entry's data was yielded (when the range started before it)."""
        if not 0 <= start <= stop <= self.size:
            raise ValueError("range outside the archive")
        lookup = crc_of or _no_crc
        for offset, length, content in self._parts(start, lookup):
            if offset >= stop:
                return
            low, high = max(start, offset) - offset, min(stop, offset + length) - offset
            if high <= low:
                continue
            if isinstance(content, DataSlice):
                yield DataSlice(content.index, low, high - low)
            else:
                yield content[low:high]


def _no_crc(index: int) -> int:
    raise ValueError(f"entry {index} has no CRC-32 known up front")
