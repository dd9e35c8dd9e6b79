"""fsck: the blob store and the index checked against each other, and orphans repaired."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import time
from pathlib import Path

import pytest

from ricord_archive.blobstore import FileBlobStore
from tests import dcmtk, load

pytestmark = pytest.mark.slow  # a server process per test


def fsck(archive, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(archive.command("fsck", *extra), capture_output=True, text=True,
                          timeout=120)


def orphan_segment_blob(blobs: Path, data: bytes, age: float | None = None) -> str:
    """A blob appended to a segment of its own, as a writer that died before its index
    transaction leaves it; `age` seconds old."""
    store = FileBlobStore(blobs, 1024**2)
    key = store.new_key()
    store.write(key, data)
    store.close()
    if age is not None:
        old = time.time() - age
        os.utime(store.path(key), (old, old))
    return key


def orphan_file_blob(blobs: Path, name: str, age: float | None = None) -> Path:
    """A blob file of its own (the layout before segments), never indexed."""
    orphan = blobs / name[:2] / name[2:4] / f"{name}.dcm"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"written, never committed")
    if age is not None:
        os.utime(orphan, (time.time() - age, time.time() - age))
    return orphan


def test_fsck_reports_and_repairs(make_archive, corpus):
    archive = make_archive()
    files = corpus.study(corpus.patient(), dt.date(2020, 4, 4), slices=3)
    assert dcmtk.storescu(archive.dimse_port, files).stderr.count("(Success)") == 3
    clean = fsck(archive)
    assert clean.returncode == 0, clean.stderr
    assert "orphan blobs (no index row): 0" in clean.stdout

    root = archive.data_dir / "blobs"
    store = FileBlobStore(root)
    keys = sorted((row.blob_key for row in load.indexed_instances(archive).values()),
                  key=lambda k: store.local_file(k).offset)
    assert len({store.path(k) for k in keys}) == 1  # one segment, in the order written
    store.delete(keys[0])  # a row whose blob is gone
    last = store.local_file(keys[2])
    os.truncate(last.path, last.offset + 100)  # a row whose blob is short
    orphans = [orphan_segment_blob(root, b"never committed", 7200),
               orphan_file_blob(root, "ab" + "cd" + "0" * 28, 7200)]
    young = [orphan_segment_blob(root, b"being committed right now"),
             orphan_file_blob(root, "abcd" + "1" * 28)]
    partial = root / "tmp" / "crashed.part"
    partial.write_bytes(b"half")
    os.utime(partial, (time.time() - 7200, time.time() - 7200))

    found = fsck(archive)
    assert found.returncode == 1
    assert "orphan blobs (no index row): 2" in found.stdout
    assert "index rows whose blob is missing: 1" in found.stdout
    assert "index rows whose blob has the wrong size: 1" in found.stdout
    assert "partial writes and unused segments: 1" in found.stdout
    assert orphans[1].exists() and partial.exists()
    assert store.open(orphans[0]).read() == b"never committed"

    repaired = fsck(archive, "--repair")
    assert "removed 3 files" in repaired.stdout
    assert not orphans[1].exists() and not partial.exists()
    with pytest.raises(FileNotFoundError):
        store.open(orphans[0])
    assert young[1].exists()  # within the grace period: maybe about to be committed
    assert store.open(young[0]).read() == b"being committed right now"
    assert repaired.returncode == 1  # the missing and short blobs are still reported
    assert "fsck" in archive.log()  # the start-up check ran in report mode

    emptied = store.path(orphans[0])  # the orphan's segment holds no live blob now
    os.utime(emptied, (time.time() - 7200, time.time() - 7200))
    again = fsck(archive, "--repair")
    assert "partial writes and unused segments: 1" in again.stdout, again.stdout
    assert not emptied.exists() and store.path(keys[1]).exists()
    assert store.path(young[0]).exists()


def test_the_orphan_collector_removes_old_orphans_while_serving(make_archive, corpus):
    archive = make_archive(
        "collector", "[limits]\norphan_collect_interval = 1\norphan_grace = 600\n"
    )
    files = corpus.study(corpus.patient(), dt.date(2020, 4, 5), slices=2)
    assert dcmtk.storescu(archive.dimse_port, files).stderr.count("(Success)") == 2
    root = archive.data_dir / "blobs"
    store = FileBlobStore(root)
    stored = {k for k, _, _ in store.walk()}
    orphans = [orphan_file_blob(root, "ef01" + "2" * 28, 7200),
               orphan_segment_blob(root, b"never committed", 7200)]
    young = [orphan_file_blob(root, "ef01" + "3" * 28),
             orphan_segment_blob(root, b"being committed right now")]
    deadline = time.monotonic() + 60
    while orphans[0].exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # polling for the collector's next round
    assert not orphans[0].exists()
    on_disk = {k for k, _, _ in store.walk()}
    assert orphans[1] not in on_disk
    assert young[0].exists() and young[1] in on_disk and stored <= on_disk
    assert "orphan collector removed 2 orphan" in archive.log()
    [study] = archive.client().search_for_studies()
    assert study["00201208"]["Value"] == [2]
