"""Running DCMTK's command-line tools as the DIMSE peers of the tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from tests.conftest import DCMTK_ENV

TIMEOUT = 120


def tool(name: str) -> str | None:
    """DCMTK's program on PATH, not a Python console script of the same name (pynetdicom
    installs `storescu`, `findscu`, ... into virtual environments): DCMTK's are binaries."""
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory or ".") / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            with candidate.open("rb") as handle:
                if handle.read(4) == b"\x7fELF":
                    return str(candidate)
    return None


def run(name: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    program = tool(name)
    assert program, f"DCMTK's {name} is required (apt-get install dcmtk)"
    return subprocess.run(
        [program, *args], capture_output=True, text=True, errors="replace", env=DCMTK_ENV,
        timeout=TIMEOUT,
        cwd=cwd,
    )


def echoscu(port: int, calling: str = "ECHOSCU") -> subprocess.CompletedProcess:
    return run("echoscu", "-aet", calling, "-aec", "RICORD", "127.0.0.1", str(port))


def storescu(
    port: int, files: list[Path], calling: str = "STORESCU"
) -> subprocess.CompletedProcess:
    """Send files on one association (uncompressed transfer syntaxes proposed)."""
    return run(
        "storescu", "-v", "-aet", calling, "-aec", "RICORD", "127.0.0.1", str(port),
        *[str(f) for f in files],
    )


def findscu(port: int, out_dir: Path, keys: dict[str, str], calling: str = "FINDSCU"
            ) -> list[Dataset]:
    """A Study Root C-FIND at STUDY level; returns the response identifiers."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("rsp*.dcm"):
        old.unlink()
    args = ["findscu", "-S", "-X", "-od", str(out_dir), "-aet", calling, "-aec", "RICORD"]
    for key, value in {"QueryRetrieveLevel": "STUDY", **keys}.items():
        args += ["-k", f"{key}={value}" if value else key]
    result = run(*args, "127.0.0.1", str(port))
    assert result.returncode == 0, result.stderr
    return [pydicom.dcmread(p) for p in sorted(out_dir.glob("rsp*.dcm"))]


def start(name: str, *args: str, log: Path) -> subprocess.Popen:
    """Start a DCMTK server program in the background, its output to `log`."""
    program = tool(name)
    assert program, f"DCMTK's {name} is required (apt-get install dcmtk)"
    with log.open("ab") as out:
        return subprocess.Popen([program, *args], stdout=out, stderr=subprocess.STDOUT,
                                env=DCMTK_ENV)
