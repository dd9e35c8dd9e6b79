"""`ricord-archive import`: a folder of files, a zip file and a DICOMDIR through the ingest
pipeline; progress, summary and report; re-runs store nothing new; --resume skips."""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import zipfile
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.fileset import FileSet

from ricord_archive.tools import ToolError
from ricord_archive.tools.import_files import collect, read_report
from tests import load
from tests.phi_corpus import PhiCorpus

pytestmark = pytest.mark.slow  # a server process per test

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CONFIG = '[[sites]]\nname = "registry"\nsiteid = "616161"\n'


@dataclass
class Layout:
    incoming: Path  # a folder: loose files, a zip, a text file, a Secondary Capture image
    dicomdir: Path  # a DICOMDIR in a folder of its own
    planted: set[str]
    stored: int  # objects that should be stored


@pytest.fixture
def layout(tmp_path) -> Layout:
    corpus = PhiCorpus(seed=4242, out_dir=tmp_path / "corpus")
    first = corpus.study(corpus.patient(), dt.date(2019, 2, 3), slices=4)
    second = corpus.study(corpus.patient(), dt.date(2020, 2, 3), slices=2)
    third = corpus.study(corpus.patient(), dt.date(2021, 2, 3), slices=3)
    incoming = tmp_path / "incoming"
    (incoming / "loose" / "deeper").mkdir(parents=True)
    first[0].rename(incoming / "loose" / "a.dcm")
    first[1].rename(incoming / "loose" / "deeper" / "b")
    with zipfile.ZipFile(incoming / "batch.zip", "w") as archive:
        archive.mkdir("x")
        archive.write(first[2], "x/c.dcm")
        archive.write(first[3], "x/d.dcm")
        archive.writestr("x/DICOMDIR", b"a zip's DICOMDIR is skipped: its files are all read")
    (incoming / "notes.txt").write_text("not DICOM")
    screenshot = pydicom.dcmread(second[0])
    screenshot.SOPClassUID = screenshot.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    screenshot.SOPInstanceUID = "1.2.826.0.1.3680043.10.9.8"
    screenshot.file_meta.MediaStorageSOPInstanceUID = screenshot.SOPInstanceUID
    screenshot.save_as(incoming / "screenshot.dcm")
    media = FileSet()
    for path in [*second, *third]:
        media.add(path)
    media.write(tmp_path / "media")
    return Layout(incoming, tmp_path / "media" / "DICOMDIR", corpus.corpus.planted,
                  4 + 2 + 3)


def import_command(tmp_path: Path, *args: str) -> list[str]:
    (tmp_path / "config.toml").write_text(CONFIG)
    return [sys.executable, "-m", "ricord_archive", "import", "--site", "registry", *args,
            "--data-dir", str(tmp_path / "data"), "--config", str(tmp_path / "config.toml")]


ENV = {k: v for k, v in os.environ.items() if not k.startswith("RICORD_")}


def run_import(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(import_command(tmp_path, *args), capture_output=True, text=True,
                          env=ENV, timeout=300)


def summary(stderr: str) -> dict[str, str]:
    return dict(line.strip().split(": ", 1) for line in stderr.splitlines()
                if ": " in line and not line.startswith("20") and "/" not in line)


def blobs(tmp_path: Path) -> dict[str, bytes]:
    return load.stored_blobs(tmp_path / "data")


def report_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_folder_zip_and_dicomdir_imported_once_and_resumable(tmp_path, layout):
    paths = (str(layout.incoming), str(layout.dicomdir))
    first_report = tmp_path / "first.jsonl"
    first = run_import(tmp_path, "--report", str(first_report), *paths)
    assert first.returncode == 0, first.stderr
    counts = summary(first.stderr)
    assert (counts["stored"], counts["already stored"], counts["refused"],
            counts["secondary-capture"], counts["unreadable"]) == (
        str(layout.stored), "0", "1", "1", "1")
    lines = report_lines(first_report)
    assert len(lines) == layout.stored + 2
    by_path = {Path(line["path"]).name: line for line in lines}
    assert by_path["notes.txt"]["outcome"] == "unreadable"
    assert by_path["screenshot.dcm"]["outcome"] == "refused"
    assert by_path["screenshot.dcm"]["reason"] == "secondary-capture"
    assert by_path["screenshot.dcm"]["sop_instance_uid"].startswith("2.25.")
    assert {line["path"] for line in lines if "!" in line["path"]} == {
        f"{layout.incoming / 'batch.zip'}!x/c.dcm", f"{layout.incoming / 'batch.zip'}!x/d.dcm"}
    stored_uids = {line["sop_instance_uid"] for line in lines if line["outcome"] == "stored"}
    files = blobs(tmp_path)
    assert {str(pydicom.dcmread(BytesIO(d)).SOPInstanceUID) for d in files.values()} \
        == stored_uids
    needles = {v.encode() for v in layout.planted}
    for data in files.values():
        ds = pydicom.dcmread(BytesIO(data))
        assert ds.ClinicalTrialSiteID == "616161"
        assert not [n for n in needles if n in data]

    again = run_import(tmp_path, *paths)  # no --resume: ingest recognises every object
    assert again.returncode == 0, again.stderr
    counts = summary(again.stderr)
    assert (counts["stored"], counts["already stored"]) == ("0", str(layout.stored))
    assert blobs(tmp_path) == files

    touched = layout.incoming / "loose" / "a.dcm"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    resumed_report = tmp_path / "resumed.jsonl"
    resumed = run_import(tmp_path, "--resume", str(first_report), "--report",
                         str(resumed_report), *paths)
    assert resumed.returncode == 0, resumed.stderr
    counts = summary(resumed.stderr)
    assert (counts["stored"], counts["already stored"], counts["skipped (done in the --resume "
            "report)"]) == ("0", "1", str(layout.stored + 1))
    assert len(report_lines(resumed_report)) == len(lines)
    assert blobs(tmp_path) == files


def test_progress_shows_counts_and_throughput_on_a_terminal(tmp_path, layout):
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 200, 0, 0))  # 200 columns
    process = subprocess.Popen(import_command(tmp_path, str(layout.incoming)),
                               stdout=subprocess.DEVNULL, stderr=terminal, env=ENV)
    os.close(terminal)
    output = b""
    while True:  # read while it runs: a full terminal buffer would block it
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the other end is closed and drained
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    assert process.wait(timeout=300) == 0
    text = output.decode(errors="replace")
    assert "importing: 100%" in text
    assert "stored 4, already 0, refused 1, unreadable 1, failed 0" in text
    assert "MB/s" in text and ("file/s" in text or "s/file" in text)
    assert "stored: 4" in text


def test_collect_follows_dicomdirs_and_opens_zips_by_content(tmp_path, layout):
    # a DICOMDIR given itself is followed; inside a folder walk, it is the walk that finds
    # its files; each file is collected once whatever way it is named
    media = layout.dicomdir.parent
    followed = collect([layout.dicomdir])
    walked = collect([media])
    assert len(followed) == 5
    assert sorted(s.label for s in followed) == sorted(s.label for s in walked)
    assert len(collect([layout.dicomdir, media, media / followed[0].label])) == 5
    disguised = tmp_path / "batch.dcm"
    (layout.incoming / "batch.zip").rename(disguised)
    [c, d] = collect([disguised])
    assert (c.member, d.member) == ("x/c.dcm", "x/d.dcm")
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK\x03\x04 and nothing else")
    [item] = collect([broken])
    assert item.problem.startswith("broken zip file")
    with pytest.raises(ToolError, match="no such file or folder"):
        collect([tmp_path / "missing"])
    (tmp_path / "DICOMDIR").write_bytes(b"not a DICOMDIR")
    with pytest.raises(ToolError, match="not a readable DICOMDIR"):
        collect([tmp_path / "DICOMDIR"])


def test_a_report_read_back_skips_what_does_not_parse(tmp_path):
    report = tmp_path / "report.jsonl"
    good = {"path": "/a", "size": 3, "mtime_ns": 9, "outcome": "stored", "reason": None,
            "sop_instance_uid": "2.25.1"}
    report.write_text(json.dumps(good) + "\n{\"path\": \"/b\"}\nnot json\n{\"pa")
    assert read_report(report) == {("/a", 3, 9): good}
    with pytest.raises(ToolError, match="cannot read the report"):
        read_report(tmp_path / "missing.jsonl")
