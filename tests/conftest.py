"""Fixtures that run the real archive: a server process on free ports with its own data
directory and embedded PostgreSQL, waited for on /health with a deadline."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
from dicomweb_client.api import DICOMwebClient
from hypothesis import settings

from ricord_archive.dimse import reactor_checkpoint
from ricord_archive.index.embedded import EmbeddedPostgres
from tests.phi_corpus import PhiCorpus

START_DEADLINE = 90.0
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
# The tests' pynetdicom clients: without it they lose responses that come back at once.
reactor_checkpoint.install()

# Property tests draw the same examples on every run, so the test command passes or fails the
# same way on every machine; `HYPOTHESIS_PROFILE=explore` draws new ones (and remembers failures).
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


def every_instance(client: DICOMwebClient, **options) -> list[dict]:
    """Every instance the archive holds (that the client may see), study by study: an instance
    search must name its studies (QIDO-RS /instances over the whole archive is 400)."""
    return [instance for study in client.search_for_studies()
            for instance in client.search_for_instances(study["0020000D"]["Value"][0],
                                                        **options)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Archive:
    data_dir: Path
    log_path: Path
    config: Path | None = None
    http_port: int = field(default_factory=free_port)
    dimse_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    cafile: Path | None = None  # set when the archive serves HTTPS with a certificate it signs

    @property
    def root(self) -> str:
        return f"{'https' if self.cafile else 'http'}://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.root}/dicom-web"

    def client(self) -> DICOMwebClient:
        return DICOMwebClient(self.dicomweb_url)

    def command(self, *args: str) -> list[str]:
        config = ["--config", str(self.config)] if self.config else []
        return [sys.executable, "-m", "ricord_archive", *args, "--data-dir", str(self.data_dir),
                *config]

    def start(self) -> Archive:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RICORD_")}
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*self.command("serve"), "--http-port", str(self.http_port),
             "--dimse-port", str(self.dimse_port)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        log.close()
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_DEADLINE
        context = ssl.create_default_context(cafile=self.cafile) if self.cafile else None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"archive exited ({self.process.returncode}):\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.root}/health", timeout=2,
                                            context=context) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)  # polling interval, not a wait for an outcome
        raise RuntimeError(f"archive not ready within {START_DEADLINE}s:\n{self.log()}")

    def stop(self) -> int:
        """SIGTERM and wait: the archive stops its listeners and the embedded PostgreSQL."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def make_archive(tmp_path_factory) -> Iterator:
    """Start archives on demand; all are stopped (and their PostgreSQL with them) at the end."""
    started: list[Archive] = []

    def make(name: str = "archive", config_text: str | None = None) -> Archive:
        base = tmp_path_factory.mktemp(name)
        config = None
        if config_text is not None:
            config = base / "ricord-archive.toml"
            config.write_text(config_text)
        archive = Archive(base / "data", base / "archive.log", config)
        started.append(archive)
        return archive.start()

    yield make
    for archive in started:
        if archive.process is not None and archive.process.poll() is None:
            archive.stop()
        _stop_leftover_postgres(archive.data_dir)


def _stop_leftover_postgres(data_dir: Path) -> None:
    """After a test killed an archive with SIGKILL its PostgreSQL may still run: stop it."""
    pid_file = data_dir / "pg" / "data" / "postmaster.pid"
    with contextlib.suppress(OSError, ValueError, IndexError):
        os.kill(int(pid_file.read_text().split()[0]), signal.SIGINT)  # fast shutdown


@pytest.fixture
def corpus(tmp_path) -> PhiCorpus:
    return PhiCorpus(seed=20261122, out_dir=tmp_path / "corpus")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[str]:
    """An embedded PostgreSQL for the index tests of one module; its URL."""
    embedded = EmbeddedPostgres(tmp_path_factory.mktemp("index") / "pg")
    url = embedded.start()
    yield url
    embedded.stop()


async def fresh_database(url: str, name: str) -> str:
    """A new empty database `name` in the cluster of `url`; its URL."""
    conn = await asyncpg.connect(url.replace("/ricord?", "/postgres?"))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return url.replace("/ricord?", f"/{name}?")
