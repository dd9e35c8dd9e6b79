"""An embedded PostgreSQL cluster under the data directory, for a zero-set-up archive.

The binaries come from the `pgserver` wheel, or from a PostgreSQL installed on the machine.
PostgreSQL refuses to run as root, so a root process runs it as an unprivileged system user.
The server listens on a Unix socket only (mode 0700 directory), never on TCP.
A server left running by a crashed archive is adopted; a stale postmaster.pid is handled by pg_ctl.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

log = logging.getLogger(__name__)

DATABASE = "ricord"
SUPERUSER = "postgres"
PORT = 5432
SERVICE_USER = "ricord-pg"
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes including ".s.PGSQL.5432" and a NUL


class EmbeddedPostgresError(RuntimeError):
    pass


def find_binaries() -> Path:
    """The directory holding initdb, pg_ctl and postgres."""
    spec = importlib.util.find_spec("pgserver")  # located, not imported: it has side effects
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "pginstall" / "bin"
        if (candidate / "pg_ctl").exists():
            return candidate
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).resolve().parent
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "pg_ctl").exists():
            return candidate
    raise EmbeddedPostgresError(
        "no PostgreSQL binaries found: install the 'pgserver' package or PostgreSQL, "
        "or configure database_url"
    )


@dataclass(frozen=True)
class _RunAs:
    uid: int | None
    gid: int | None

    def chown(self, path: Path) -> None:
        if self.uid is not None:
            os.chown(path, self.uid, self.gid or -1)


def _service_account() -> _RunAs:
    if os.geteuid() != 0:
        return _RunAs(None, None)
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
             SERVICE_USER],
            check=True, capture_output=True,
        )
        entry = pwd.getpwnam(SERVICE_USER)
    return _RunAs(entry.pw_uid, entry.pw_gid)


def _make_traversable(path: Path) -> None:
    """Let the service account reach `path`: add search permission (o+x) to its ancestors."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            log.warning("adding search permission (o+x) to %s for the embedded PostgreSQL", parent)
            parent.chmod(mode | 0o001)


class EmbeddedPostgres:
    """Initialises, starts, adopts and stops one PostgreSQL cluster."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pgdata = root / "data"
        self.log_file = root / "postgres.log"
        self.bin = find_binaries()
        self.run_as = _service_account()
        self._started_here = False

    def _run(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
        return subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            user=self.run_as.uid, group=self.run_as.gid, env=env, cwd="/",
            capture_output=True, text=True, timeout=timeout, check=check,
        )

    def _socket_dir(self) -> Path:
        wanted = self.root / "run"
        if len(str(wanted)) + len(f"/.s.PGSQL.{PORT}") < _MAX_SOCKET_PATH:
            wanted.mkdir(mode=0o700, exist_ok=True)
            self.run_as.chown(wanted)
            return wanted
        short = Path(tempfile.mkdtemp(prefix="ricord-pg-"))
        self.run_as.chown(short)
        return short

    def _initialise(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        self.run_as.chown(self.root)
        if self.run_as.uid is not None:
            _make_traversable(self.root)
            _make_traversable(self.bin)
        if (self.pgdata / "PG_VERSION").exists():
            return
        if self.pgdata.exists():
            shutil.rmtree(self.pgdata)  # a half-done initdb from an interrupted first start
        log.info("initialising the embedded PostgreSQL cluster in %s", self.pgdata)
        result = self._run(
            "initdb", "-D", str(self.pgdata), "-U", SUPERUSER, "--auth=trust",
            "--encoding=UTF8", "--locale=C", check=False,
        )
        if result.returncode != 0:
            raise EmbeddedPostgresError(f"initdb failed: {result.stderr.strip()}")

    def _lock_file(self) -> list[str]:
        try:
            return (self.pgdata / "postmaster.pid").read_text().splitlines()
        except OSError:
            return []

    def _running_socket_dir(self) -> Path | None:
        """The socket directory of a live server on this cluster, if one is running."""
        lines = self._lock_file()
        if len(lines) < 5 or not _is_live_postgres(lines[0]):
            return None
        socket_dir = Path(lines[4].strip())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # it may still be starting up or shutting down
            if not _is_live_postgres(lines[0]):
                return None
            if _accepts_connections(socket_dir):
                return socket_dir
            time.sleep(0.1)
        raise EmbeddedPostgresError(
            f"a PostgreSQL process ({lines[0].strip()}) holds {self.pgdata} but does not answer"
        )

    def _clear_stale_lock(self) -> None:
        """Remove the lock of a dead server once no old process is attached to its shared memory.

        A SIGKILLed postmaster can linger as a zombie that pg_ctl takes for a running server.
        """
        lines = self._lock_file()
        if not lines:
            return
        shm_id = lines[6].split()[-1] if len(lines) > 6 and lines[6].split() else None
        deadline = time.monotonic() + 30
        while shm_id and _shm_attached(shm_id) and time.monotonic() < deadline:
            time.sleep(0.1)  # the old server's children exit when they notice its death
        if shm_id and _shm_attached(shm_id):
            raise EmbeddedPostgresError(
                "processes of a dead PostgreSQL server are still attached to its shared memory"
            )
        log.info("removing the stale lock files of a PostgreSQL server that is gone")
        if len(lines) > 4 and lines[4].strip():
            for name in (f".s.PGSQL.{PORT}.lock", f".s.PGSQL.{PORT}"):
                (Path(lines[4].strip()) / name).unlink(missing_ok=True)
        (self.pgdata / "postmaster.pid").unlink(missing_ok=True)

    def start(self) -> str:
        """Start (or adopt) the server; return the URL of the archive database (may not exist)."""
        self._initialise()
        socket_dir = self._running_socket_dir()
        if socket_dir is not None:
            log.info("using the embedded PostgreSQL that is already running on this data directory")
        else:
            self._clear_stale_lock()
            socket_dir = self._socket_dir()
            options = (
                f"-c listen_addresses='' -p {PORT} -k {socket_dir} "
                "-c unix_socket_permissions=0700 -c max_connections=100 "
                "-c log_min_messages=warning -c log_min_error_statement=panic "
                "-c log_error_verbosity=terse"
            )
            result = self._run(
                "pg_ctl", "start", "-w", "-t", "60", "-D", str(self.pgdata),
                "-l", str(self.log_file), "-o", options, check=False,
            )
            if result.returncode != 0:
                raise EmbeddedPostgresError(
                    f"the embedded PostgreSQL did not start: {result.stderr.strip()} "
                    f"(see {self.log_file})"
                )
            self._started_here = True
        return connection_url(socket_dir)

    def stop(self) -> None:
        """Stop the server cleanly (fast shutdown: sessions rolled back, data checkpointed)."""
        if not (self.pgdata / "postmaster.pid").exists():
            return
        result = self._run("pg_ctl", "stop", "-w", "-t", "60", "-m", "fast", "-D",
                           str(self.pgdata), check=False)
        if result.returncode != 0:
            lines = self._lock_file()
            if lines and not _is_live_postgres(lines[0]):
                self._clear_stale_lock()
            else:
                log.warning("pg_ctl stop failed: %s", result.stderr.strip())

    def current_url(self) -> str | None:
        """The URL of the running server, or None when it is not running."""
        if not (self.pgdata / "PG_VERSION").exists():
            return None
        socket_dir = self._running_socket_dir()
        return connection_url(socket_dir) if socket_dir else None


def _is_live_postgres(pid_text: str) -> bool:
    """Whether the PID runs a postgres process that is not a zombie."""
    try:
        stat = Path(f"/proc/{int(pid_text)}/stat").read_text()
    except (OSError, ValueError):
        return False
    name, state = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2]
    return name.startswith("postgres") and state not in "ZX"


def _shm_attached(shm_id: str) -> bool:
    """Whether any process is attached to the SysV shared memory segment `shm_id`."""
    try:
        rows = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    except OSError:
        return False
    for row in rows:
        fields = row.split()
        if fields[1] == shm_id:
            return int(fields[6]) > 0
    return False


def _accepts_connections(socket_dir: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(str(socket_dir / f".s.PGSQL.{PORT}"))
        except OSError:
            return False
    return True


def connection_url(socket_dir: Path) -> str:
    return f"postgresql://{SUPERUSER}@/{DATABASE}?host={quote(str(socket_dir))}&port={PORT}"
