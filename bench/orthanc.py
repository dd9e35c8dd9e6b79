"""Orthanc 1.10 (Debian's packages) as the reference peer of the benchmarks, on 127.0.0.1 only.

    python bench/orthanc.py install                 apt-get what is missing (no service starts)
    python bench/orthanc.py run sqlite|pg [--seconds 600]   start one, print its URLs, wait, stop

What was learned setting it up (the reasons for what this module does):

- Orthanc 1.10.1 has no bind-address option and listens on 0.0.0.0: it is started with
  `LD_PRELOAD` of a tiny shim (compiled here with gcc) that turns bind(0.0.0.0 / ::) into
  loopback, and after start its listening sockets are checked with `ss`; anything not on
  loopback and Orthanc is stopped again, and the bench refuses to go on.
- Debian's DCMTK 3.6.7 (Orthanc's DICOM server, storescu, findscu) leaves Nagle's algorithm on
  unless `TCP_NODELAY=1` is in the environment: every exchange then waits ~90 ms for a delayed
  ACK. Orthanc always gets it, and so must every DCMTK client.
- The packages try to start their services when installed: a temporary /usr/sbin/policy-rc.d
  exiting 101 is in place during apt-get (an existing one is left alone).
- The PostgreSQL variant uses Debian's postgresql-15 server on a cluster created under the
  bench's work directory as user postgres (initdb refuses root), listening on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PACKAGES = ("orthanc", "orthanc-dicomweb", "orthanc-postgresql", "postgresql-15", "dcmtk",
            "gcc", "libc6-dev", "iproute2")
ORTHANC = Path("/usr/sbin/Orthanc")
PLUGINS = Path("/usr/share/orthanc/plugins")
PG_BIN = Path("/usr/lib/postgresql/15/bin")
POLICY = Path("/usr/sbin/policy-rc.d")
AET = "ORTHANC"

SHIM_SOURCE = r"""
/* LD_PRELOAD shim: any bind() to INADDR_ANY / in6addr_any goes to loopback instead. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <arpa/inet.h>
typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);
int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static bind_fn real_bind = 0;
    if (!real_bind) real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
    if (addr && addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        struct sockaddr_in a; memcpy(&a, addr, sizeof a);
        if (a.sin_addr.s_addr == htonl(INADDR_ANY)) a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        return real_bind(fd, (struct sockaddr *)&a, sizeof a);
    }
    if (addr && addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 a; memcpy(&a, addr, sizeof a);
        if (!memcmp(&a.sin6_addr, &in6addr_any, sizeof(struct in6_addr)))
            a.sin6_addr = in6addr_loopback;
        return real_bind(fd, (struct sockaddr *)&a, sizeof a);
    }
    return real_bind(fd, addr, len);
}
"""


class PeerError(RuntimeError):
    """Orthanc or its PostgreSQL could not be installed, started or checked."""


def wait_until_ready(
    process: subprocess.Popen, url: str, timeout: float, log_path: Path
) -> None:
    """Poll `url` until it answers 200; PeerError (with the log's tail) if the process exits
    or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise PeerError(f"{process.args[0]} exited at start:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise PeerError(f"{url} did not answer in {timeout:.0f} s")
        time.sleep(0.1)


def log(message: str) -> None:
    print(f"[orthanc] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dcmtk_tool(name: str) -> str:
    """DCMTK's program (Debian's /usr/bin), not pynetdicom's console script of the same name
    that a venv puts first on PATH."""
    for folder in ("/usr/bin", "/usr/local/bin"):
        path = Path(folder) / name
        if path.exists():
            return str(path)
    raise PeerError(f"DCMTK's {name} is missing (apt-get install dcmtk)")


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


# ----------------------------------------------------------------------------------- install
def _installed(package: str) -> bool:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package],
                            capture_output=True, text=True, check=False)
    return result.stdout.strip() == "install ok installed"


def ensure_installed(packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """apt-get install what is missing, with no service starting; returns what was installed."""
    missing = [p for p in packages if not _installed(p)]
    if not missing:
        return []
    if os.geteuid() != 0:
        raise PeerError(f"missing Debian packages {' '.join(missing)}: run as root to install")
    orthanc_was_there = _installed("orthanc")
    created_policy = False
    if not POLICY.exists():
        POLICY.write_text("#!/bin/sh\n# temporary (ricord bench): no service starts\nexit 101\n")
        POLICY.chmod(0o755)
        created_policy = True
    try:
        log(f"apt-get install --no-install-recommends {' '.join(missing)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, timeout=900)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                       check=True, env=env, timeout=1800)
    finally:
        if created_policy:
            POLICY.unlink(missing_ok=True)
    if not orthanc_was_there and Path("/run/systemd/system").is_dir() and shutil.which(
        "systemctl"
    ):  # the packaged service listens on all interfaces with the stock configuration
        subprocess.run(["systemctl", "disable", "--now", "orthanc.service"],
                       capture_output=True, check=False)
    return missing


def build_shim(folder: Path) -> Path:
    """Compile the loopback shim into `folder` and check that it works."""
    folder.mkdir(parents=True, exist_ok=True)
    source, shim = folder / "bindlo.c", folder / "bindlo.so"
    source.write_text(SHIM_SOURCE)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(shim), str(source), "-ldl"],
                   check=True, capture_output=True, timeout=120)
    probe = subprocess.run(
        [sys.executable, "-c", "import socket; s = socket.socket(); s.bind(('0.0.0.0', 0)); "
                               "print(s.getsockname()[0])"],
        env={**os.environ, "LD_PRELOAD": str(shim)}, capture_output=True, text=True, check=True,
        timeout=60,
    )
    if probe.stdout.strip() != "127.0.0.1":
        raise PeerError(f"loopback shim does not work: bind(0.0.0.0) gave {probe.stdout!r}")
    return shim


def listening_sockets(pid: int) -> list[str]:
    """Local addresses of the TCP sockets `pid` listens on (from `ss`)."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3] for line in out.splitlines() if f"pid={pid}," in line]


def _loopback(address: str) -> bool:
    return address.startswith(("127.", "[::1]:", "[::ffff:127."))


# --------------------------------------------------------------------------------- PostgreSQL
def _as_postgres(*args: str, timeout: float = 120, check: bool = True
                 ) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd="/", user="postgres", group="postgres",
                          extra_groups=[], capture_output=True, text=True, timeout=timeout,
                          check=check, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"})


class PostgresCluster:
    """Debian's PostgreSQL 15 on a cluster of its own under `root`, on 127.0.0.1:`port`."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.data = root / "data"
        self.port = port or free_port()

    def start(self) -> None:
        if not (PG_BIN / "initdb").exists():
            raise PeerError(f"{PG_BIN}/initdb missing (apt-get install postgresql-15)")
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.root, "postgres", "postgres")
        self.root.chmod(0o700)
        for parent in self.root.parents:   # postgres must be able to enter the work directory
            if parent.stat().st_mode & 0o001 == 0:
                raise PeerError(f"user postgres cannot enter {parent}: choose another --work-dir")
        if not (self.data / "PG_VERSION").exists():
            _as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres",
                         "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8")
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 "
                   f"-c unix_socket_directories={self.root} -c shared_buffers=512MB")
        result = _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l",
                              str(self.root / "server.log"), "-w", "-t", "60", "-o", options,
                              "start", check=False)
        if result.returncode != 0:
            raise PeerError(f"PostgreSQL did not start: {result.stderr.strip()} "
                            f"(see {self.root / 'server.log'})")
        if self.sql("SELECT 1 FROM pg_roles WHERE rolname = 'orthanc'") != "1":
            self.sql("CREATE USER orthanc WITH PASSWORD 'orthanc'")
        self.recreate_database()

    def sql(self, statement: str) -> str:
        result = subprocess.run(
            [str(PG_BIN / "psql"), "-X", "-q", "-tA", "-v", "ON_ERROR_STOP=1", "-h",
             str(self.root), "-p", str(self.port), "-U", "postgres", "-d", "postgres", "-c",
             statement], capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise PeerError(f"psql {statement!r}: {result.stderr.strip()}")
        return result.stdout.strip()

    def recreate_database(self) -> None:
        self.sql("DROP DATABASE IF EXISTS orthanc")
        self.sql("CREATE DATABASE orthanc OWNER orthanc")

    def pids(self) -> list[int]:
        """The postmaster and all its children."""
        try:
            postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        return [postmaster, *descendants(postmaster)]

    def version(self) -> str:
        return subprocess.run([str(PG_BIN / "postgres"), "--version"], capture_output=True,
                              text=True, check=False).stdout.strip()

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                         "-t", "60", "stop", check=False)


def descendants(pid: int) -> list[int]:
    """All processes below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


# ------------------------------------------------------------------------------------ Orthanc
class Orthanc:
    """One Orthanc process (variant sqlite or pg) with its storage under `root`."""

    def __init__(self, root: Path, variant: str, shim: Path,
                 pg: PostgresCluster | None = None) -> None:
        if variant not in ("sqlite", "pg") or (variant == "pg") != (pg is not None):
            raise ValueError(f"variant {variant!r} (pg needs a cluster, sqlite none)")
        self.root = root / f"orthanc-{variant}"
        self.variant = variant
        self.shim = shim
        self.pg = pg
        self.http_port = free_port()
        self.dimse_port = free_port()
        self.aet = AET
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def _config(self) -> Path:
        plugins = [str(PLUGINS / "libOrthancDicomWeb.so")]
        if self.pg:
            plugins.append(str(PLUGINS / "libOrthancPostgreSQLIndex.so"))
        config = {
            "Name": f"RICORD-BENCH-{self.variant}",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "StorageCompression": False, "MaximumStorageSize": 0, "MaximumPatientCount": 0,
            "Plugins": plugins, "ConcurrentJobs": 2,
            "HttpServerEnabled": True, "OrthancExplorerEnabled": False,
            "HttpPort": self.http_port, "HttpDescribeErrors": True,
            "HttpCompressionEnabled": False, "WebDavEnabled": False,
            "DicomServerEnabled": True, "DicomAet": self.aet, "DicomCheckCalledAet": False,
            "DicomPort": self.dimse_port, "DefaultEncoding": "Latin1",
            "UnknownSopClassAccepted": True, "DicomScpTimeout": 30,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "SslEnabled": False,
            "DicomModalities": {}, "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True, "DicomThreadsCount": 4, "HttpThreadsCount": 50,
            "KeepAlive": True, "TcpNoDelay": True, "StableAge": 60, "SaveJobs": False,
            "OverwriteInstances": False, "StorageAccessOnFind": "Always",
            "SyncStorageArea": True,   # fsync each stored file (the default since 1.7.4)
            "LimitFindResults": 0, "LimitFindInstances": 0,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                         "WadoRoot": "/wado", "Host": f"127.0.0.1:{self.http_port}",
                         "Ssl": False, "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
            "PostgreSQL": {
                "EnableIndex": self.pg is not None, "EnableStorage": False,
                "Host": "127.0.0.1", "Port": self.pg.port if self.pg else 5432,
                "Database": "orthanc", "Username": "orthanc", "Password": "orthanc",
                "Lock": False, "EnableSsl": False, "MaximumConnectionRetries": 10,
                "ConnectionRetryInterval": 2, "IndexConnectionsCount": 1,
            },
        }
        for folder in ("storage", "index", "logs"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(config, indent=1))
        return path

    def start(self, timeout: float = 120) -> None:
        if not ORTHANC.exists():
            raise PeerError(f"{ORTHANC} missing (python bench/orthanc.py install)")
        config = self._config()
        env = {**os.environ, "LD_PRELOAD": str(self.shim), "TCP_NODELAY": "1"}
        with open(self.root / "stdout.log", "ab") as out:
            self.process = subprocess.Popen(
                [str(ORTHANC), f"--logdir={self.root / 'logs'}", str(config)], cwd=self.root,
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            wait_until_ready(self.process, f"{self.url}/system", timeout,
                             self.root / "stdout.log")
        except PeerError:
            self.stop()
            raise
        self._check_loopback()

    def _check_loopback(self) -> None:
        sockets = listening_sockets(self.process.pid)
        exposed = [s for s in sockets if not _loopback(s)]
        missing = [p for p in (self.http_port, self.dimse_port)
                   if not any(s.endswith(f":{p}") for s in sockets)]
        if exposed or missing:
            self.stop()
            raise PeerError(f"Orthanc listened on {sockets}: not loopback-only ({exposed}) or "
                            f"missing ports {missing}; refusing to benchmark")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)

    def reset(self) -> None:
        """An empty archive: stop, wipe storage and index (pg: drop and create the database),
        start."""
        self.stop()
        for folder in ("storage", "index"):
            shutil.rmtree(self.root / folder, ignore_errors=True)
        if self.pg:
            self.pg.recreate_database()
        self.start()

    def versions(self) -> dict[str, str]:
        """Orthanc's and its plugins' versions, from its REST API."""
        found = {}
        with urllib.request.urlopen(f"{self.url}/system", timeout=10) as answer:
            found["orthanc"] = json.load(answer).get("Version", "?")
        with urllib.request.urlopen(f"{self.url}/plugins", timeout=10) as answer:
            plugins = json.load(answer)
        for plugin in plugins:
            if "." in plugin:   # explorer.js, not a plugin
                continue
            with urllib.request.urlopen(f"{self.url}/plugins/{plugin}", timeout=10) as answer:
                found[plugin] = json.load(answer).get("Version", "?")
        return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("install", help="apt-get install what is missing")
    run = commands.add_parser("run", help="start Orthanc, wait, stop")
    run.add_argument("variant", choices=("sqlite", "pg"))
    run.add_argument("--seconds", type=float, default=600)
    args = parser.parse_args()
    installed = ensure_installed()
    log(f"installed {' '.join(installed)}" if installed else "all packages are installed")
    if args.command == "install":
        return 0
    work = Path(tempfile.mkdtemp(prefix="ricord-orthanc-", dir="/var/tmp"))
    work.chmod(0o755)
    pg = PostgresCluster(work / "pg") if args.variant == "pg" else None
    orthanc = Orthanc(work, args.variant, build_shim(work), pg)
    try:
        if pg:
            pg.start()
        orthanc.start()
        print(f"Orthanc ({args.variant}) {orthanc.versions()}: HTTP {orthanc.url}, DICOMweb "
              f"{orthanc.dicomweb}, DICOM {orthanc.aet}@127.0.0.1:{orthanc.dimse_port}; "
              f"stops in {args.seconds:.0f} s or on Ctrl-C", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(args.seconds)
    finally:
        orthanc.stop()
        if pg:
            pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
