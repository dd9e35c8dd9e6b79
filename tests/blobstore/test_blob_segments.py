"""The segment blob store on its own: appends, reads, walks, deletes, and what a crash leaves."""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import os
import struct
import threading
import time
from pathlib import Path

import pytest

from ricord_archive.blobstore import FileBlobStore, direct, segment_writer
from ricord_archive.blobstore import segments as seg

MIB = 1024**2


def aligned_writes(path: Path) -> int:
    """Direct I/O where the file system has it; elsewhere (tmpfs) the same page-aligned writes
    through a plain descriptor, so the direct layout is tested on any machine."""
    return direct.open_direct(path) or os.open(path, os.O_WRONLY | os.O_CLOEXEC)


@pytest.fixture(params=["direct", "page-cache"])
def store(tmp_path, request, monkeypatch):
    monkeypatch.setattr(segment_writer, "open_direct",
                        aligned_writes if request.param == "direct" else lambda path: None)
    blobs = FileBlobStore(tmp_path / "blobs", 4 * MIB)
    yield blobs
    blobs.close()


def put(blobs: FileBlobStore, data: bytes) -> str:
    key = blobs.new_key()
    blobs.write(key, data)
    return key


def payload(n: int, size: int = 10_000) -> bytes:
    return hashlib.sha256(str(n).encode()).digest() * (size // 32) + bytes([n % 256])


def test_blobs_read_back_whole_ranged_and_by_sendfile_location(store):
    keys = {put(store, payload(n, 10_000 + n)): payload(n, 10_000 + n) for n in range(30)}
    assert len({store.path(k) for k in keys}) == 1  # all in one segment
    for key, data in keys.items():
        assert seg.KEY.match(key)
        with store.open(key) as stream:
            assert stream.read() == data
            stream.seek(100)
            assert stream.read(50) == data[100:150]
            assert stream.seek(0, os.SEEK_END) == len(data)
            assert stream.read() == b""
        where = store.local_file(key)
        with where.path.open("rb") as raw:
            raw.seek(where.offset)
            assert raw.read(len(data)) == data
    assert {k: size for k, size, _ in store.walk()} == {k: len(d) for k, d in keys.items()}


def test_direct_writes_start_on_pages_and_read_back_without_their_padding(tmp_path, monkeypatch):
    monkeypatch.setattr(segment_writer, "open_direct", aligned_writes)
    blobs = FileBlobStore(tmp_path / "blobs", 4 * MIB)
    try:
        sizes = [1, 4095, 4096, 4097, 10_601, 527_000]
        keys = {put(blobs, payload(n, size)): payload(n, size) for n, size in enumerate(sizes)}
        offsets = sorted(blobs.local_file(key).offset for key in keys)
        assert all(offset % direct.PAGE == 0 for offset in offsets)
        gaps = [b - a for a, b in itertools.pairwise(offsets)]
        assert gaps == [direct.aligned(len(payload(n, size)))
                        for n, size in enumerate(sizes[:-1])]
        for key, data in keys.items():
            with blobs.open(key) as stream:
                assert stream.read() == data
        assert {k: size for k, size, _ in blobs.walk()} == {k: len(d) for k, d in keys.items()}
    finally:
        blobs.close()


def test_an_object_larger_than_what_is_left_is_a_file_of_its_own(store):
    big = os.urandom(5 * MIB)
    key = put(store, big)
    with store.open(key) as stream:
        assert stream.read() == big
    assert store.local_file(key).offset == 0
    assert dict((k, s) for k, s, _ in store.walk())[key] == len(big)
    store.settle()  # the next segment is ready
    following = put(store, b"next")  # the full segment is left for the next one
    assert store.path(following) != store.path(key)
    store.delete(key)
    assert not list(store.segments.folder.glob("*.dcm"))


def test_walk_stops_at_a_torn_tail_and_skips_what_a_crash_left(store):
    good = [put(store, payload(n)) for n in range(3)]
    segment, _ = seg.parse_key(good[0])
    abandoned = store.new_key()  # reserved; its writer died before writing
    later = put(store, payload(9))  # a concurrent writer finished later slots
    torn = store.new_key()
    store.write(torn, payload(10))
    path = store.path(torn)
    _, index = seg.parse_key(torn)
    slot_at = 4096 + index * 64
    with path.open("r+b") as raw:  # the slot's second half never reached the disk
        raw.seek(slot_at + 32)
        raw.write(bytes(32))
    listed = {k for k, _, _ in store.walk()}
    assert listed == {*good, later}
    assert abandoned not in listed and torn not in listed
    with pytest.raises(FileNotFoundError):
        store.open(torn)
    # a slot that reached the disk before its bytes did: listed, but reading it whole fails
    _, last = seg.parse_key(later)
    with store.open(later) as stream:
        stream.read(1)
    with path.open("r+b") as raw:
        raw.seek(store.local_file(later).offset + 5)
        raw.write(b"\0" * 100)
    with store.open(later) as stream, pytest.raises(OSError):
        stream.read()
    assert segment == seg.parse_key(later)[0] and last > 0


def test_delete_punches_a_hole_and_the_emptied_segment_is_removed(tmp_path):
    store = FileBlobStore(tmp_path / "blobs", 8 * MIB)
    keys = [put(store, os.urandom(512 * 1024)) for _ in range(6)]
    path = store.path(keys[0])
    os.fsync(os.open(path, os.O_RDONLY))
    before = path.stat().st_blocks
    store.delete(keys[1])
    assert path.stat().st_blocks <= before - (512 * 1024 - 8192) // 512
    assert keys[1] not in {k for k, _, _ in store.walk()}
    with pytest.raises(FileNotFoundError):
        store.open(keys[1])
    store.delete(keys[1])  # deleting again: nothing
    for key in keys:
        store.delete(key)
    names = [name for name, _ in store.temporary_files()]
    assert f"segments/{path.name}" not in names  # still held by its writer
    store.close()
    names = [name for name, _ in store.temporary_files()]
    assert f"segments/{path.name}" in names
    for name in names:
        store.remove_temporary(name)
    assert not list((tmp_path / "blobs" / "segments").iterdir())


def test_a_segment_with_a_live_blob_is_not_removed(tmp_path):
    store = FileBlobStore(tmp_path / "blobs", 4 * MIB)
    key = put(store, b"keep me")
    store.close()
    name = f"segments/{store.path(key).name}"
    assert name not in [n for n, _ in store.temporary_files()]
    store.remove_temporary(name)  # as if a stale report named it
    assert store.open(key).read() == b"keep me"


def test_concurrent_writers_share_one_flush(store, monkeypatch):
    calls, gate = [], threading.Event()
    real = os.fdatasync

    def slow_first(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            assert gate.wait(30)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow_first)
    keys = [store.new_key() for _ in range(4)]
    data = [payload(n, 100_000) for n in range(4)]
    first = threading.Thread(target=store.write, args=(keys[0], data[0]))
    first.start()
    while not calls:
        time.sleep(0.001)  # the first writer is in its flush
    others = [threading.Thread(target=store.write, args=(k, d))
              for k, d in zip(keys[1:], data[1:], strict=True)]
    for thread in others:
        thread.start()
    segment = store._writer._open[seg.parse_key(keys[0])[0]]
    deadline = time.monotonic() + 30
    while segment.ticket < 4 and time.monotonic() < deadline:
        time.sleep(0.001)  # the three others appended and wait for a flush
    gate.set()
    for thread in [first, *others]:
        thread.join()
    assert len(calls) == 2  # the first writer's, then one for the three others
    for key, expected in zip(keys, data, strict=True):
        assert store.open(key).read() == expected


def test_many_threads_write_at_once(store):
    found: dict[str, bytes] = {}

    def writer(n: int) -> None:
        for i in range(40):
            data = payload(n * 100 + i, 1000 + 997 * i)
            found[put(store, data)] = data

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(found) == 320
    assert {k: s for k, s, _ in store.walk()} == {k: len(d) for k, d in found.items()}
    for key, data in found.items():
        assert store.open(key).read() == data


def test_a_restarted_store_never_appends_to_an_old_segment(tmp_path):
    first = FileBlobStore(tmp_path / "blobs", 4 * MIB)
    old = put(first, b"before the restart")
    first.close()
    digests = {p.name: hashlib.sha256(p.read_bytes()).digest()
               for p in (tmp_path / "blobs" / "segments").iterdir()}
    second = FileBlobStore(tmp_path / "blobs", 4 * MIB)
    other = FileBlobStore(tmp_path / "blobs", 4 * MIB)  # another process sharing the folder
    new, beside = put(second, b"after"), put(other, b"beside")
    assert len({second.path(k) for k in (old, new, beside)}) == 3
    for name, digest in digests.items():
        assert hashlib.sha256((tmp_path / "blobs" / "segments" / name).read_bytes()).digest() \
            == digest
    assert {k for k, _, _ in second.walk()} == {old, new, beside}
    second.close()
    other.close()


@pytest.mark.parametrize("key", [
    "s/" + "0" * 32 + "/01", "s/" + "0" * 32 + "/-1", "s/" + "A" * 32 + "/1",
    "s/" + "0" * 31 + "/1", "s/" + "0" * 32 + "/1234567890", "s/" + "0" * 32 + "/1/",
    "s/../" + "0" * 32 + "/1", "../s/" + "0" * 32 + "/1", "s/" + "0" * 32 + "/1\n",
    "ab/cd/" + "0" * 32 + ".dcm\n",
])
def test_malformed_segment_keys_are_refused(store, key):
    for use in (store.path, store.open, store.delete, store.local_file,
                lambda k: store.write(k, b"x")):
        with pytest.raises(ValueError):
            use(key)


def test_only_keys_handed_out_for_writing_are_written_and_never_twice(store, tmp_path):
    key = put(store, b"first")
    with pytest.raises(ValueError):
        store.write(key, b"second")  # never overwritten
    other = FileBlobStore(tmp_path / "other", 4 * MIB)
    with pytest.raises(ValueError):
        store.write(other.new_key(), b"not ours")
    other.close()
    segment, _ = seg.parse_key(key)
    with pytest.raises(ValueError):
        store.write(f"s/{segment}/4000", b"never reserved")
    assert store.open(key).read() == b"first"


def test_keys_of_files_of_their_own_still_work(tmp_path):
    old_store = FileBlobStore(tmp_path / "blobs")  # as the archive wrote blobs before segments
    old = put(old_store, b"an object from before")
    assert not seg.KEY.match(old)
    store = FileBlobStore(tmp_path / "blobs", 4 * MIB)
    new = put(store, b"a new object")
    assert {k for k, _, _ in store.walk()} == {old, new}
    assert store.open(old).read() == b"an object from before"
    assert store.local_file(old) == seg.Location(tmp_path / "blobs" / old, 0)
    store.delete(old)
    assert not (tmp_path / "blobs" / old).exists()
    assert {k for k, _, _ in store.walk()} == {new}
    store.close()


def test_walk_reports_the_write_time_or_an_older_file_time(store):
    key = put(store, b"x")
    [(_, _, written)] = [w for w in store.walk() if w[0] == key]
    assert abs(written - time.time()) < 600
    path: Path = store.path(key)
    os.utime(path, (1_000_000, 1_000_000))  # aged on purpose (as the tests of fsck do)
    [(_, _, aged)] = [w for w in store.walk() if w[0] == key]
    assert aged == 1_000_000


def test_a_failed_flush_fails_the_write_and_retires_the_segment(store, monkeypatch):
    real, failing = os.fdatasync, [True]

    def once_failing(fd: int) -> None:
        if failing.pop() if failing else False:
            raise OSError(5, "I/O error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", once_failing)
    key = store.new_key()
    with pytest.raises(OSError):
        store.write(key, b"maybe lost")
    after = put(store, b"durable")  # never in the segment whose flush failed
    assert store.path(after) != store.path(key)
    assert store.open(after).read() == b"durable"


def test_without_a_ready_segment_a_key_names_a_file_of_its_own(tmp_path, monkeypatch):
    def no_space(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(segment_writer, "reserve", no_space)  # the preparer cannot make one
    store = FileBlobStore(tmp_path / "blobs", 4 * MIB)
    key = put(store, b"stored the old way")
    assert not seg.KEY.match(key)
    assert store.open(key).read() == b"stored the old way"
    assert store.local_file(key).offset == 0
    store.close()


_FIEMAP = 0xC020660B  # FS_IOC_FIEMAP
_FIEMAP_HEADER = struct.Struct("=QQIIII")  # start, length, flags, mapped, count, reserved
_FIEMAP_EXTENT = struct.Struct("=QQQQQI12x")  # logical, physical, length, 2 reserved, flags
_EXTENT_UNWRITTEN = 0x800
_EXTENT_LAST = 0x1


def unwritten(path: Path, start: int, end: int) -> int:
    """Bytes of [start, end) of `path` in extents reserved but never written (FIEMAP)."""
    found, position = 0, start
    with path.open("rb") as file:
        while position < end:
            request = bytearray(_FIEMAP_HEADER.pack(position, end - position, 1, 0, 64, 0)
                                + bytes(64 * _FIEMAP_EXTENT.size))
            fcntl.ioctl(file.fileno(), _FIEMAP, request)
            mapped = _FIEMAP_HEADER.unpack_from(request)[3]
            if not mapped:
                return found
            for n in range(mapped):
                logical, _, length, _, _, flags = _FIEMAP_EXTENT.unpack_from(
                    request, _FIEMAP_HEADER.size + n * _FIEMAP_EXTENT.size)
                if flags & _EXTENT_UNWRITTEN:
                    found += min(end, logical + length) - max(position, logical)
                position = logical + length
                if flags & _EXTENT_LAST:
                    return found
    return found


@pytest.mark.parametrize(("size", "zeroed"), [(10_600, True), (600_000, False)])
def test_space_is_written_with_zeros_ahead_of_small_blobs_only(tmp_path, monkeypatch, size,
                                                               zeroed):
    """Small blobs land in zeroed space, so their flush commits no extent conversion; large
    ones in space only reserved (zeroing would write each byte twice)."""
    monkeypatch.setattr(segment_writer, "open_direct", aligned_writes)
    blobs = FileBlobStore(tmp_path / "blobs", 64 * MIB)
    try:
        keys = [put(blobs, payload(n, size)) for n in range(40)]  # past the first window
        blobs.settle()
        path = blobs.path(keys[0])
        last = blobs.local_file(keys[-1])
        tail = last.offset + direct.aligned(size)
        ahead = 2 * MIB  # reserved beyond the last blob by now
        assert path.stat().st_size >= tail + ahead
        assert unwritten(path, 0, tail) == 0  # everything written so far is data or zeros
        assert (unwritten(path, tail, tail + ahead) == 0) is zeroed
        for n, key in enumerate(keys):
            with blobs.open(key) as stream:
                assert stream.read() == payload(n, size)
    finally:
        blobs.close()


def test_only_small_writes_into_reserved_direct_space_are_quick(tmp_path, monkeypatch):
    monkeypatch.setattr(segment_writer, "open_direct", aligned_writes)
    blobs = FileBlobStore(tmp_path / "blobs", 4 * MIB)
    try:
        key = blobs.new_key()
        assert blobs.quick(key, 10_600)
        assert blobs.quick(key, segment_writer.QUICK_BYTES)
        assert not blobs.quick(key, segment_writer.QUICK_BYTES + 1)
        blobs.write(key, payload(1))
    finally:
        blobs.close()
    monkeypatch.setattr(segment_writer, "open_direct", lambda path: None)
    cached = FileBlobStore(tmp_path / "cached", 4 * MIB)  # through the page cache: a thread's
    try:
        assert not cached.quick(cached.new_key(), 10)
    finally:
        cached.close()
    files = FileBlobStore(tmp_path / "files")  # a file of its own: create, fsync, rename
    assert not files.quick(files.new_key(), 10)
