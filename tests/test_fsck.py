"""fsck: the blob store and the index checked against each other, and orphans repaired."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import time

from tests import dcmtk


def fsck(archive, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(archive.command("fsck", *extra), capture_output=True, text=True,
                          timeout=120)


def test_fsck_reports_and_repairs(make_archive, corpus):
    archive = make_archive()
    files = corpus.study(corpus.patient(), dt.date(2020, 4, 4), slices=3)
    assert dcmtk.storescu(archive.dimse_port, files).stderr.count("(Success)") == 3
    clean = fsck(archive)
    assert clean.returncode == 0, clean.stderr
    assert "orphan blobs (no index row): 0" in clean.stdout

    blobs = sorted((archive.data_dir / "blobs").glob("??/??/*.dcm"))
    blobs[0].unlink()  # a row whose blob is gone
    blobs[1].write_bytes(blobs[1].read_bytes()[:100])  # a row whose blob is short
    old = time.time() - 7200
    orphan = archive.data_dir / "blobs" / "ab" / "cd" / ("ab" + "cd" + "0" * 28 + ".dcm")
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"written, never committed")
    os.utime(orphan, (old, old))
    young = orphan.with_name("abcd" + "1" * 28 + ".dcm")
    young.write_bytes(b"being committed right now")
    partial = archive.data_dir / "blobs" / "tmp" / "crashed.part"
    partial.write_bytes(b"half")
    os.utime(partial, (old, old))

    found = fsck(archive)
    assert found.returncode == 1
    assert "orphan blobs (no index row): 1" in found.stdout
    assert "index rows whose blob is missing: 1" in found.stdout
    assert "index rows whose blob has the wrong size: 1" in found.stdout
    assert "partial writes: 1" in found.stdout
    assert orphan.exists() and partial.exists()

    repaired = fsck(archive, "--repair")
    assert "removed 2 files" in repaired.stdout
    assert not orphan.exists() and not partial.exists()
    assert young.exists()  # within the grace period: maybe about to be committed
    assert repaired.returncode == 1  # the missing and short blobs are still reported
    assert "fsck" in archive.log()  # the start-up check ran in report mode


def test_the_orphan_collector_removes_old_orphans_while_serving(make_archive, corpus):
    archive = make_archive(
        "collector", "[limits]\norphan_collect_interval = 1\norphan_grace = 600\n"
    )
    files = corpus.study(corpus.patient(), dt.date(2020, 4, 5), slices=2)
    assert dcmtk.storescu(archive.dimse_port, files).stderr.count("(Success)") == 2
    stored = sorted((archive.data_dir / "blobs").glob("??/??/*.dcm"))
    old = time.time() - 7200
    orphan = archive.data_dir / "blobs" / "ef" / "01" / ("ef01" + "2" * 28 + ".dcm")
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"written, never committed")
    os.utime(orphan, (old, old))
    young = orphan.with_name("ef01" + "3" * 28 + ".dcm")
    young.write_bytes(b"being committed right now")
    deadline = time.monotonic() + 60
    while orphan.exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # polling for the collector's next round
    assert not orphan.exists()
    assert young.exists() and all(path.exists() for path in stored)
    assert "orphan collector removed 1 orphan" in archive.log()
    [study] = archive.client().search_for_studies()
    assert study["00201208"]["Value"] == [2]
