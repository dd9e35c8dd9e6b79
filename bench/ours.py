"""Our archive as a benchmark target: `python -m ricord_archive serve` on free loopback ports,
a fresh data directory each start (embedded PostgreSQL), stopped with SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from orthanc import PeerError, descendants, free_port, wait_until_ready

REPO = Path(__file__).resolve().parents[1]
AET = "RICORD"
SITE = "default"


class ArchiveError(RuntimeError):
    """Our archive did not start or answer."""


class Ours:
    def __init__(self, root: Path, config: Path | None = None) -> None:
        self.root = root
        self.config = config.resolve() if config else None
        self.process: subprocess.Popen | None = None
        self.data_dir: Path | None = None
        self.http_port = self.dimse_port = 0
        self.aet = AET
        self._starts = 0
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RICORD_")}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, timeout: float = 180) -> None:
        """Start on a new, empty data directory."""
        self._starts += 1
        self.data_dir = self.root / f"ours-{self._starts}"
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dimse_port = free_port(), free_port()
        self.log_path = self.root / f"ours-{self._starts}.log"
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ricord_archive", "serve", "--data-dir",
                 str(self.data_dir), "--http-port", str(self.http_port), "--dimse-port",
                 str(self.dimse_port), *(["--config", str(self.config)] if self.config else [])],
                cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_until_ready(self.process, f"{self.url}/health", timeout, self.log_path)
        except PeerError as exc:
            self.stop()
            raise ArchiveError(str(exc)) from None

    def postgres_pids(self) -> list[int]:
        """The embedded PostgreSQL's postmaster and its children."""
        if self.data_dir is None:
            return []
        try:
            text = (self.data_dir / "pg" / "data" / "postmaster.pid").read_text()
            postmaster = int(text.split()[0])
        except (OSError, ValueError, IndexError):
            return []
        return [postmaster, *descendants(postmaster)]

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
        pg = self.postgres_pids()   # the archive stops it; never leave one behind
        if pg:
            try:
                os.kill(pg[0], signal.SIGTERM)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and Path(f"/proc/{pg[0]}").exists():
                time.sleep(0.1)

    def reset(self) -> None:
        """Stop, forget the data directory, start on a new one."""
        previous = self.data_dir
        self.stop()
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        self.start()

    def cleanup(self) -> None:
        previous = self.data_dir
        self.stop()
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)

    def pseudonyms(self, patient_ids: list[str]) -> dict[str, str]:
        """Our pseudonyms of original patient IDs (`ricord-archive lookup`, which reads the
        running archive's index)."""
        result = subprocess.run(
            [sys.executable, "-m", "ricord_archive", "lookup", "--site", SITE, "--data-dir",
             str(self.data_dir), *(["--config", str(self.config)] if self.config else []),
             *patient_ids], cwd=REPO, env=self.env, capture_output=True,
            text=True, timeout=120, check=True,
        )
        found = dict(line.split("\t", 1) for line in result.stdout.splitlines() if "\t" in line)
        missing = [p for p in patient_ids if found.get(p, "not found") == "not found"]
        if missing:
            raise ArchiveError(f"no pseudonym for {missing}")
        return found
