"""The streamed ZIP64 layout (ricord_archive.dicom.zip_layout) against Python's zipfile and
Info-ZIP's `unzip -t`: whole archives, any byte range, CRCs known up front or in data
descriptors."""

from __future__ import annotations

import datetime as dt
import itertools
import random
import subprocess
import zipfile
import zlib
from pathlib import Path

import pytest

from ricord_archive.dicom.zip_layout import DataSlice, Entry, ZipLayout

WHEN = dt.datetime(2026, 12, 5, 6, 30, 12)


def render(layout: ZipLayout, blobs: list[bytes], start: int = 0, stop: int | None = None
           ) -> bytes:
    stop = layout.size if stop is None else stop
    out = bytearray()
    for part in layout.slices(start, stop, lambda i: zlib.crc32(blobs[i])):
        if isinstance(part, DataSlice):
            out += blobs[part.index][part.offset:part.offset + part.length]
        else:
            out += part
    return bytes(out)


def sample(seed: int, known_crc: bool | None) -> tuple[ZipLayout, list[bytes]]:
    """Entries of random sizes (some empty); CRCs known, unknown, or mixed (None)."""
    rng = random.Random(seed)
    blobs = [rng.randbytes(rng.choice((0, 1, 7, 1000, 70_000))) for _ in range(12)]
    entries = [
        Entry(f"482913-00000{i % 3}/2.25.1{i % 4}/2.25.2{i}/{i + 1:06d}.dcm", len(b),
              zlib.crc32(b) if (known_crc if known_crc is not None else i % 2) else None)
        for i, b in enumerate(blobs)
    ]
    entries.append(Entry("LICENSE.txt", 9, zlib.crc32(b"CC BY 4.0")))
    blobs.append(b"CC BY 4.0")
    return ZipLayout(entries, WHEN), blobs


@pytest.mark.parametrize("known_crc", [True, False, None])
def test_zipfile_reads_every_entry_back(tmp_path, known_crc):
    layout, blobs = sample(1, known_crc)
    data = render(layout, blobs)
    assert len(data) == layout.size
    path = tmp_path / "a.zip"
    path.write_bytes(data)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        infos = archive.infolist()
        assert [i.filename for i in infos] == [e.name for e in layout.entries]
        for info, blob in zip(infos, blobs, strict=True):
            assert info.compress_type == zipfile.ZIP_STORED
            assert info.date_time == (2026, 12, 5, 6, 30, 12)
            assert archive.read(info) == blob
    result = subprocess.run(["unzip", "-t", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"No errors detected in compressed data of {path}" in result.stdout
    extracted = tmp_path / "out"
    subprocess.run(["unzip", "-q", str(path), "-d", str(extracted)], check=True)
    for entry, blob in zip(layout.entries, blobs, strict=True):
        assert (extracted / entry.name).read_bytes() == blob


@pytest.mark.parametrize("known_crc", [True, None])
def test_any_range_is_the_same_bytes_as_the_whole(known_crc):
    layout, blobs = sample(2, known_crc)
    whole = render(layout, blobs)
    rng = random.Random(3)
    cuts = sorted({0, layout.size, *(rng.randrange(layout.size) for _ in range(40)),
                   *layout.local_offsets, *(layout.data_offset(i) for i in range(3)),
                   layout.central_offset, layout.end_offset, layout.size - 1})
    assert b"".join(render(layout, blobs, a, b) for a, b in itertools.pairwise(cuts)) == whole
    for _ in range(50):
        a = rng.randrange(layout.size)
        b = rng.randrange(a, layout.size + 1)
        assert render(layout, blobs, a, b) == whole[a:b]


def test_data_descriptor_crc_is_asked_only_after_the_data():
    layout, blobs = sample(4, False)
    sent: list[int] = []

    def crc_of(index: int) -> int:
        assert index in sent or not blobs[index], "a CRC asked for before its data went out"
        return zlib.crc32(blobs[index])

    for part in layout.slices(0, layout.size, crc_of):
        if isinstance(part, DataSlice) and part.index < len(blobs) - 1 and (
                part.offset + part.length == len(blobs[part.index])):
            sent.append(part.index)
    # every non-empty entry's data went out whole (the LICENSE's CRC is known up front)
    assert sent == [i for i, blob in enumerate(blobs[:-1]) if blob]


def test_a_range_past_an_unknown_crc_needs_it():
    layout, _ = sample(5, False)
    with pytest.raises(ValueError, match="no CRC-32 known"):
        list(layout.slices(layout.central_offset, layout.size))
    with pytest.raises(ValueError, match="range outside"):
        list(layout.slices(0, layout.size + 1))


def test_more_entries_than_a_classic_zip_holds(tmp_path):
    """Over 65,535 entries: only the ZIP64 end record can count them."""
    count = 65_600
    layout = ZipLayout([Entry(f"{i:06d}.dcm", 1, zlib.crc32(b"x")) for i in range(count)], WHEN)
    path = tmp_path / "many.zip"
    with path.open("wb") as out:
        for part in layout.slices(0, layout.size):
            out.write(b"x" if isinstance(part, DataSlice) else part)
    assert path.stat().st_size == layout.size
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        assert len(names) == count and names[-1] == f"{count - 1:06d}.dcm"
        assert archive.read(names[-1]) == b"x"
    result = subprocess.run(["unzip", "-tq", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-500:] + result.stderr[-500:]


def test_entry_offsets_past_4_gib_are_written_in_zip64_fields(tmp_path: Path):
    """A 5 GiB entry (never materialised): the next entry's header offset and the central
    directory's offset go in the ZIP64 fields, and zipfile finds the small entry after it."""
    big = 5 * 1024**3
    layout = ZipLayout([Entry("big.dcm", big, 0), Entry("small.txt", 2, zlib.crc32(b"ok"))],
                       WHEN)
    assert layout.local_offsets[1] > 2**32
    path = tmp_path / "sparse.zip"
    with path.open("wb") as out:  # a sparse file: the big entry's data is never written
        for part in layout.slices(0, layout.size):
            if isinstance(part, DataSlice):
                if part.index == 1:
                    out.write(b"ok")
                else:
                    out.seek(part.length, 1)
            else:
                out.write(part)
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("big.dcm")
        assert info.file_size == big and info.header_offset == 0
        assert archive.getinfo("small.txt").header_offset == layout.local_offsets[1]
        assert archive.read("small.txt") == b"ok"
