"""Where the server processes keep their metrics: prometheus_client's multi-process directory.

prometheus_client decides at import whether it runs in multi-process mode (by the environment
variable PROMETHEUS_MULTIPROC_DIR), so `use` runs before `ricord_archive.runtime.metrics` is
imported: in `ricord-archive serve`, before the archive is assembled. The worker processes
inherit it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"


def use(data_dir: Path, primary: bool) -> Path:
    """Keep this process's metrics under `<data_dir>/metrics`; the primary starts it empty
    (what an earlier run left there would count again)."""
    directory = data_dir / "metrics"
    if primary:
        shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.environ[ENV] = str(directory)
    return directory


def mark_dead(pid: int) -> None:
    """Forget the live gauges of a server process that exited (its counters still count)."""
    if not os.environ.get(ENV):
        return
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid)
