"""DCMTK's dcmqrscp as the hospital PACS of the import tests: its storage area and index in a
temporary folder, move destinations in its host table, loaded with storescu."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests import dcmtk
from tests.conftest import free_port

PACS_AET = "HOSPACS"
START_DEADLINE = 30.0


@dataclass
class Pacs:
    root: Path
    destinations: dict[str, int]  # move destination AE title -> port on 127.0.0.1
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{PACS_AET}@127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.root / "dcmqrscp.log"

    def start(self) -> Pacs:
        """Start dcmqrscp; a port taken between choosing it and binding it: another port."""
        for _ in range(3):
            if self._start():
                return self
            self.port = free_port()
        raise AssertionError(f"dcmqrscp found no free port: {self.log.read_text()[-500:]}")

    def _start(self) -> bool:
        storage = self.root / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        hosts = "\n".join(
            f"destination{n} = ({aet}, 127.0.0.1, {port})"
            for n, (aet, port) in enumerate(self.destinations.items())
        )
        config = self.root / "dcmqrscp.cfg"
        config.write_text(
            f"NetworkTCPPort = {self.port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n\n"
            f"HostTable BEGIN\n{hosts}\nHostTable END\n\n"
            "VendorTable BEGIN\nVendorTable END\n\n"
            f"AETable BEGIN\n{PACS_AET} {storage} RW (1000, 1024mb) ANY\nAETable END\n"
        )
        self.process = dcmtk.start("dcmqrscp", "-c", str(config), log=self.log)
        deadline = time.monotonic() + START_DEADLINE
        while dcmtk.run("echoscu", "-aec", PACS_AET, "127.0.0.1", str(self.port)).returncode:
            if self.process.poll() is not None:
                log = self.log.read_text(errors="replace")
                assert "Address already in use" in log, log
                return False
            assert time.monotonic() < deadline, "dcmqrscp did not start"
            time.sleep(0.1)  # polling interval, not a wait for an outcome
        return True

    def load(self, files: list[Path]) -> None:
        result = dcmtk.run(
            "storescu", "-aet", "LOADER", "-aec", PACS_AET, "127.0.0.1", str(self.port),
            *[str(f) for f in files],
        )
        assert result.returncode == 0, result.stderr

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
