"""Real PostgreSQL clusters for the read-replica tests: a primary and a streaming hot standby
(pg_basebackup -R), each on its own free 127.0.0.1 port, without Unix sockets.

PostgreSQL refuses to run as root: run as root, the server programs run as the unprivileged
system user the embedded PostgreSQL uses (created the same way when missing)."""

from __future__ import annotations

import os
import pwd
import subprocess
import time
from pathlib import Path

from ricord_archive.index.embedded import SERVICE_USER
from tests.conftest import free_port

DATABASE = "ricord"
REPLICATION_USER = "replicator"


def binaries() -> Path:
    """Debian's PostgreSQL server programs (initdb, pg_ctl, pg_basebackup, psql)."""
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "pg_basebackup").exists() and (candidate / "initdb").exists():
            return candidate
    raise AssertionError("PostgreSQL server programs are required (apt-get install postgresql)")


def _account() -> tuple[int, int] | None:
    """(uid, gid) to run the server as when this is root, else None (run as ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", SERVICE_USER], check=True, capture_output=True)
        entry = pwd.getpwnam(SERVICE_USER)
    return entry.pw_uid, entry.pw_gid


class Cluster:
    """One PostgreSQL cluster under `root`, listening on 127.0.0.1:`port` only."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.log = root / "server.log"
        self.port = free_port()
        self.bin = binaries()
        self.account = _account()
        root.mkdir(parents=True)
        root.chmod(0o700)
        if self.account is not None:
            os.chown(root, *self.account)
            for parent in root.parents:  # the server's user must be able to enter its root
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    parent.chmod(mode | 0o001)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        uid, gid = self.account or (None, None)
        result = subprocess.run(
            [str(self.bin / program), *args], user=uid, group=gid, cwd="/",
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", "LANG": "C"},
            capture_output=True, text=True, timeout=120, check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{program} {' '.join(args)} failed: {result.stderr}\n"
                                 f"{self.server_log()}")
        return result

    def _configure(self) -> None:
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                "unix_socket_directories = ''\nwal_level = replica\nmax_wal_senders = 5\n"
                "hot_standby = on\nfsync = off\nshared_buffers = 16MB\n"
            )

    def init_primary(self) -> Cluster:
        """initdb, trust for the superuser and replication from 127.0.0.1 only, started, with
        a replication user and the archive's (empty) database."""
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-E", "UTF8",
                  "--locale=C", "--no-sync", "--auth=trust")
        (self.data / "pg_hba.conf").write_text(
            "host all postgres 127.0.0.1/32 trust\n"
            f"host replication {REPLICATION_USER} 127.0.0.1/32 trust\n"
        )
        self._configure()
        self.start()
        self.sql(f"CREATE ROLE {REPLICATION_USER} WITH REPLICATION LOGIN", database="postgres")
        self.sql(f"CREATE DATABASE {DATABASE}", database="postgres")
        return self

    def init_standby_of(self, primary: Cluster) -> Cluster:
        """A streaming hot standby of `primary` (base backup with its WAL, standby.signal and
        primary_conninfo written by -R), started."""
        self._run("pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port), "-U",
                  REPLICATION_USER, "-D", str(self.data), "-R", "-X", "stream",
                  "-c", "fast", "--no-sync")
        self._configure()  # its own port (appended last: wins over the primary's)
        self.start()
        return self

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "start")

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop",
                      check=False)

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def promote(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "promote")

    def sql(self, statement: str, database: str = DATABASE) -> str:
        """One statement through psql over TCP; its rows as unaligned text."""
        result = subprocess.run(
            [str(self.bin / "psql"), "-X", "-q", "-tA", "-v", "ON_ERROR_STOP=1",
             "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database,
             "-c", statement],
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", "LANG": "C"},
            capture_output=True, text=True, timeout=60, check=False,
        )
        if result.returncode != 0:
            raise AssertionError(f"psql {statement!r}: {result.stderr.strip()}")
        return result.stdout.strip()

    def pause_replay(self) -> None:
        """Stop applying the primary's WAL (a standby only); returns once replay is paused."""
        self.sql("SELECT pg_wal_replay_pause()")
        deadline = time.monotonic() + 30
        while self.sql("SELECT pg_get_wal_replay_pause_state()") != "paused":
            assert time.monotonic() < deadline, "WAL replay did not pause"
            time.sleep(0.05)  # polling interval

    def resume_replay(self) -> None:
        self.sql("SELECT pg_wal_replay_resume()")

    def server_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""
