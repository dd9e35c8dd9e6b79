"""Direct I/O for segment data: each blob's bytes go from an aligned buffer straight to the
device (`O_DIRECT`), page-aligned and padded to whole pages.

Measured on ext4 (a 527 KB blob into space `posix_fallocate` reserved, then `fdatasync`):
through the page cache 1.1-1.4 ms, direct 0.35-0.4 ms; 10 KB 0.20 against 0.13 ms. The
flush then has only the slot and the extent conversion left to commit. Where the file system
refuses `O_DIRECT` (tmpfs, some network file systems) the writer keeps writing through the
page cache.
"""

from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path

PAGE = 4096  # offset, length and buffer alignment of a direct write (any block size up to it)

_buffers = threading.local()


def aligned(size: int) -> int:
    """`size` rounded up to whole pages: the room a blob takes in a direct segment."""
    return -(-size // PAGE) * PAGE


def open_direct(path: Path) -> int | None:
    """A write descriptor of `path` for direct I/O; None where the file system has none."""
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except (OSError, AttributeError):  # EINVAL on tmpfs; no O_DIRECT outside Linux
        return None


def write_direct(fd: int, data: bytes, offset: int) -> None:
    """Write `data` at a page-aligned `offset`, zero-padded to whole pages, through this
    thread's page-aligned buffer (anonymous memory is page-aligned)."""
    size = aligned(len(data))
    buffer: mmap.mmap | None = getattr(_buffers, "buffer", None)
    if buffer is None or len(buffer) < size:
        if buffer is not None:
            buffer.close()
        buffer = _buffers.buffer = mmap.mmap(-1, max(size, 1024**2))
    view = memoryview(buffer)
    try:
        view[:len(data)] = data
        view[len(data):size] = bytes(size - len(data))
        done = 0
        while done < size:  # a short direct write ends on a page boundary
            done += os.pwrite(fd, view[done:size], offset + done)
    finally:
        view.release()


_ZEROS = 1024**2  # bytes of zeros written per call


def zero_direct(fd: int, start: int, end: int) -> None:
    """Write zeros over every whole page in [start, end) (the rest is left as it is)."""
    position, stop = aligned(start), end // PAGE * PAGE
    zeros = getattr(_buffers, "zeros", None)
    if zeros is None:
        zeros = _buffers.zeros = mmap.mmap(-1, _ZEROS)  # anonymous memory: zeros, aligned
    with memoryview(zeros) as view:
        while position < stop:
            position += os.pwrite(fd, view[:min(_ZEROS, stop - position)], position)
