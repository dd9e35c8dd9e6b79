"""Several server processes sharing the ports: connections reach all of them, a dead worker is
replaced, the workers stop with the primary (SIGTERM) and die with it (kill -9)."""

from __future__ import annotations

import datetime as dt
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests import dcmtk
from tests.scrape import scrape

pytestmark = pytest.mark.slow  # several server processes

_TWO = "[server]\nprocesses = 2\n"


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in "ZX":
            found.append(int(stat.parent.name))
    return found


def _workers(pid: int) -> list[int]:
    """The archive's worker processes (its postgres children are not among them)."""
    workers = []
    for child in _children(pid):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--worker-of" in command:
            workers.append(child)
    return workers


def _wait_for(condition, seconds: float = 60.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.1)  # polling for the processes to change
    raise AssertionError(f"not reached within {seconds} s")


def _established(pid: int, port: int) -> int:
    """How many established TCP connections on local `port` process `pid` holds."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":  # ESTABLISHED
            inodes.add(fields[9])
    held = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            held += 1
    return held


def test_associations_reach_every_process_and_sigterm_stops_them_all(make_archive, corpus):
    archive = make_archive("two", _TWO)
    [worker] = _workers(archive.process.pid)
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", archive.dimse_port, ae_title="RICORD") for _ in range(16)]
    try:
        assert all(a.is_established for a in held)
        per_process = [_established(pid, archive.dimse_port)
                       for pid in (archive.process.pid, worker)]
        assert sum(per_process) == 16
        assert all(count > 0 for count in per_process), per_process  # 2**-15 to fail by chance
    finally:
        for association in held:
            association.release()
    files = corpus.study(corpus.patient(), dt.date(2021, 1, 2), slices=6)
    with ThreadPoolExecutor(3) as senders:
        results = list(senders.map(
            lambda share: dcmtk.storescu(archive.dimse_port, share), [files[n::3] for n in range(3)]
        ))
    assert [r.stderr.count("(Success)") for r in results] == [2, 2, 2]
    [study] = archive.client().search_for_studies()
    assert study["00201208"]["Value"] == [6]
    assert archive.stop() == 0
    _wait_for(lambda: not Path(f"/proc/{worker}").exists())


def _pool_connections(archive) -> float:
    """The connections every server process's pool may open, summed by /metrics."""
    return scrape(f"{archive.root}/metrics").value("ricord_db_pool_max_connections")


def test_a_dead_worker_is_replaced_and_workers_die_with_the_primary(make_archive):
    archive = make_archive("two", _TWO)
    [worker] = _workers(archive.process.pid)
    os.kill(worker, signal.SIGKILL)
    [replacement] = _wait_for(
        lambda: [w for w in _workers(archive.process.pid) if w != worker] or None
    )
    assert "worker process 1 exited with code -9" in archive.log()
    _wait_for(lambda: f"worker process 1 started (pid {replacement})" in archive.log())
    assert dcmtk.echoscu(archive.dimse_port).returncode == 0
    # the dead worker's live gauges are forgotten: two processes' pools, not three
    _wait_for(lambda: _pool_connections(archive) == 20 or None)
    archive.kill()
    _wait_for(lambda: not Path(f"/proc/{replacement}").exists())
    archive.start()  # and the next start finds the ports free and the index as it was
    assert len(_workers(archive.process.pid)) == 1
    assert dcmtk.echoscu(archive.dimse_port).returncode == 0
    _wait_for(lambda: _pool_connections(archive) == 20 or None)  # what the killed left: gone
