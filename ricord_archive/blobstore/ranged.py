"""A seekable read-only file over a blob that is read by ranges (a slice of a segment file, an
object in an S3 store): position, seeking and reads here; the ranged read itself in each store."""

from __future__ import annotations

import io


class RangedFile(io.RawIOBase):
    """`size` bytes, offset 0 their first, read through `_read(start, length)`."""

    def __init__(self, name: str, size: int) -> None:
        self._size, self._position = size, 0
        self.name = name  # pydicom names a dataset read from a file-like object after it

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readall(self) -> bytes:
        """The rest in one ranged read (RawIOBase's would ask 8 KB at a time)."""
        return self._take(self._size - self._position)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._take(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _take(self, wanted: int) -> bytes:
        wanted = min(wanted, self._size - self._position)
        if wanted <= 0:
            return b""
        data = self._read(self._position, wanted)
        self._position += len(data)
        return data

    def _read(self, start: int, length: int) -> bytes:
        """`length` bytes from `start` (within the blob)."""
        raise NotImplementedError
