"""DIMSE limits and a graceful stop: associations beyond the limit are rejected, SIGTERM lets
the association in progress finish."""

from __future__ import annotations

import datetime as dt
import signal
import subprocess
import time

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests import dcmtk
from tests.conftest import DCMTK_ENV

pytestmark = pytest.mark.slow  # a server process per test, graceful shutdown


def test_associations_beyond_the_limit_are_rejected(make_archive):
    # one process: the limit is per server process (README, Configuration)
    archive = make_archive("limits", "[server]\nprocesses = 1\n[limits]\nmax_associations = 1\n")
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", archive.dimse_port, ae_title="RICORD")
    try:
        assert held.is_established
        second = dcmtk.echoscu(archive.dimse_port)
        assert second.returncode != 0
        assert "Local Limit Exceeded" in second.stderr + second.stdout
    finally:
        held.release()
    assert dcmtk.echoscu(archive.dimse_port).returncode == 0


def test_sigterm_lets_the_association_in_progress_finish(make_archive, corpus, tmp_path):
    archive = make_archive()
    files = corpus.study(corpus.patient(), dt.date(2020, 9, 9), slices=40)
    log = tmp_path / "storescu.log"
    with log.open("w") as out:
        sender = subprocess.Popen(
            [dcmtk.tool("storescu"), "-v", "-aec", "RICORD", "127.0.0.1",
             str(archive.dimse_port), *map(str, files)],
            stdout=out, stderr=subprocess.STDOUT, env=DCMTK_ENV,
        )
    deadline = time.monotonic() + 60
    while "(Success)" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)  # polling for the first acknowledged object
    archive.process.send_signal(signal.SIGTERM)
    assert sender.wait(timeout=120) == 0
    assert archive.process.wait(timeout=120) == 0
    assert log.read_text().count("Received Store Response (Success)") == 40
    archive.start()
    [study] = archive.client().search_for_studies()
    assert study["00201208"]["Value"] == [40]
    assert dcmtk.echoscu(archive.dimse_port).returncode == 0
