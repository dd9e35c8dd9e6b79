"""`ricord-archive import-pacs`: studies out of a hospital PACS into a site, by accession number
or by patient (and date range), through the archive's own ingest pipeline.

For each accession number a STUDY-level C-FIND, keeping only the studies whose AccessionNumber
equals the requested one exactly (some PACS match accession numbers as wildcards or prefixes);
then each study is moved (`--method move`: C-MOVE to the archive's AE title) or fetched
(`--method get`: C-GET, the objects arrive on the same association and this command ingests
them). Transient failures are retried a bounded number of times.

Moved objects arrive at a C-STORE SCP from the PACS's calling AE title, which may belong to no
site or to another one. Before each move the study is registered in an import session in
PostgreSQL (the importing site, the PACS's calling AE title, a keyed hash of the study's UID);
the C-STORE SCP of every node consults the sessions, so the objects are filed under the
importing site whichever node receives them. The SCP is this command's own, listening on
`--listen-port` (default: the configured DIMSE port) for the duration of the import; when that
port is taken, the archive running there receives the objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import errno
import io
import json
import logging
import re
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TextIO

from pydicom.dataset import Dataset
from tqdm import tqdm

from ricord_archive.config import Config
from ricord_archive.dicom.status import MOVE_DESTINATION_UNKNOWN, OUT_OF_RESOURCES, SUCCESS
from ricord_archive.dimse.client import (
    PacsAddress,
    PacsClient,
    PacsError,
    Transfer,
    transient_status,
)
from ricord_archive.dimse.server import DimseServer
from ricord_archive.errors import ArchiveError, StorageUnavailable
from ricord_archive.index.import_rows import StudyCounts
from ricord_archive.tools import ToolError
from ricord_archive.tools.services import ArchiveServices, archive_services, operator

log = logging.getLogger(__name__)

ACCESSION_COLUMN = "AccessionNumber"
_DATE_RANGE = re.compile(r"^(?:[0-9]{8}|[0-9]{8}-(?:[0-9]{8})?|-[0-9]{8})\Z")
_HEADER = "query\toutcome\tstudies\tmoved\tstored\talready_stored\trefused\tfailed"


@dataclass(frozen=True)
class Wanted:
    """One request: studies with this AccessionNumber, or this PatientID (and StudyDate)."""

    key: str  # AccessionNumber or PatientID: matched exactly in the PACS's answers
    value: str
    date_range: str = ""

    @property
    def kind(self) -> str:
        return "accession" if self.key == "AccessionNumber" else "patient"

    @property
    def label(self) -> str:
        return f"{self.value} {self.date_range}" if self.date_range else self.value

    def find_keys(self) -> dict[str, str]:
        keys = dict.fromkeys(
            ("StudyInstanceUID", "AccessionNumber", "PatientID", "StudyDate"), ""
        )
        keys[self.key] = self.value
        keys["StudyDate"] = self.date_range
        return keys

    def matches(self, answer: object) -> bool:
        return str(getattr(answer, self.key, "") or "").strip() == self.value.strip()


@dataclass(frozen=True)
class PacsImportRequest:
    site: str
    pacs: PacsAddress
    wanted: list[Wanted]
    method: str = "move"  # or "get"
    listen_port: int | None = None  # None: the configured DIMSE port
    calling_aet: str | None = None  # ours towards the PACS; None: the archive's AE title
    move_destination: str | None = None  # the archive as the PACS knows it; None: our AE title
    pacs_calling_aet: str | None = None  # the PACS's when it sends; None: its AE title
    retries: int = 2
    retry_delay: float = 2.0  # seconds, doubled at each retry


@dataclass
class WantedReport:
    """What became of one request."""

    query: str
    kind: str  # accession or patient
    outcome: str = "not found"  # imported, incomplete, failed
    candidates: int = 0  # studies the PACS answered
    studies: int = 0  # of those, with exactly the requested value
    moved: int = 0  # sub-operations the PACS completed
    stored: int = 0
    duplicates: int = 0  # already stored
    refused: int = 0  # refused by policy or not processable
    failed: int = 0
    attempts: int = 0
    study_uids: list[str] = field(default_factory=list)  # de-identified
    error: str | None = None

    def line(self) -> str:
        return "\t".join(str(v) for v in (
            self.query, self.outcome, self.studies, self.moved, self.stored, self.duplicates,
            self.refused, self.failed,
        ))


def read_accessions(path: Path) -> list[str]:
    """Accession numbers from a text file (one a line; blank and `#` lines skipped) or a CSV
    file with an AccessionNumber column ('-': standard input)."""
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ToolError(f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ToolError(f"{path} is not a UTF-8 text file") from exc
    first = text.splitlines()[0] if text.strip() else ""
    if path.suffix.lower() == ".csv" or ACCESSION_COLUMN in next(csv.reader([first]), []):
        reader = csv.DictReader(io.StringIO(text))
        if ACCESSION_COLUMN not in (reader.fieldnames or ()):
            raise ToolError(f"{path} has no {ACCESSION_COLUMN} column in its header row")
        values = [row[ACCESSION_COLUMN] or "" for row in reader]
    else:
        values = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [v.strip() for v in values if v.strip()]


def wanted_list(
    accessions: list[str], patient_id: str | None, date_range: str | None
) -> list[Wanted]:
    """The requests, each once; values a C-FIND cannot carry are refused."""
    if date_range and not patient_id:
        raise ToolError("--date-range goes with --patient-id")
    if date_range and not _DATE_RANGE.match(date_range):
        raise ToolError("--date-range must be YYYYMMDD, YYYYMMDD-YYYYMMDD, YYYYMMDD- or -YYYYMMDD")
    wanted = [Wanted("AccessionNumber", a) for a in dict.fromkeys(accessions)]
    if patient_id:
        wanted.append(Wanted("PatientID", patient_id.strip(), date_range or ""))
    for item in wanted:
        if "\\" in item.value or not item.value.isprintable():
            raise ToolError(f"a requested {item.key} holds a backslash or a control character")
    if not wanted:
        raise ToolError("nothing to import: give --accessions FILE, --accession or --patient-id")
    return wanted


def worth_retrying(transfer: Transfer | None, counts: StudyCounts, error: PacsError | None
                   ) -> bool:
    """Transient: the PACS unreachable or out of resources, or the archive's index or disk
    failing (objects refused by policy are not sent again)."""
    if error is not None:
        return error.transient
    return (transfer is not None and transient_status(transfer.status)) or counts.failed > 0


@dataclass
class _Counts:
    """Outcomes of the objects one C-GET delivered (the C-GET handler's thread writes)."""

    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    failed: int = 0

    def frozen(self) -> StudyCounts:
        return StudyCounts(self.stored, self.duplicates, self.refused, self.failed)


class PacsImport:
    def __init__(
        self, config: Config, services: ArchiveServices, request: PacsImportRequest
    ) -> None:
        self.config = config
        self.services = services
        self.request = request
        self.site = services.sites[request.site]
        self.client = PacsClient(request.pacs, request.calling_aet or config.ae_title)
        self.destination = request.move_destination or config.ae_title
        self.session: int | None = None  # the import session, for moves
        self._get_counts = _Counts()  # what the current C-GET delivered

    @contextlib.asynccontextmanager
    async def receiving(self) -> AsyncIterator[None]:
        """For moves: an import session, and this command's C-STORE SCP unless an archive
        already listens on the port."""
        if self.request.method != "move":
            yield
            return
        listener = await self._listen()
        sessions = self.services.sessions
        self.session = await sessions.open(
            self.site, self.request.pacs_calling_aet or self.request.pacs.aet
        )
        try:
            yield
        finally:
            await sessions.close(self.session)
            if listener is not None:
                await listener.stop()

    async def _listen(self) -> DimseServer | None:
        port = self.request.listen_port or self.config.dimse_port
        services = self.services
        server = DimseServer(
            replace(self.config, dimse_port=port), services.ingest, services.query,
            services.retrieve, services.sessions, services.audit,
        )
        try:
            await server.start()
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise ToolError(f"cannot listen on port {port}: {exc.strerror}") from exc
            log.info("port %d is in use: the archive listening there receives the studies", port)
            return None
        log.info("receiving the studies as %s on port %d", self.destination, port)
        return server

    async def one(self, wanted: Wanted) -> WantedReport:
        report = WantedReport(wanted.label, wanted.kind)
        try:
            answers = await self._find(wanted)
        except PacsError as exc:
            report.outcome, report.error = "failed", str(exc)
            return report
        report.candidates = len(answers)
        uids = list(dict.fromkeys(
            str(a.StudyInstanceUID).strip() for a in answers
            if wanted.matches(a) and str(a.get("StudyInstanceUID", "") or "").strip()
        ))
        report.studies = len(uids)
        for uid in uids:
            await self._study(uid, report)
        if report.error is not None and not report.stored + report.duplicates:
            report.outcome = "failed"
        elif report.error is not None or report.failed:
            report.outcome = "incomplete"
        elif uids:
            report.outcome = "imported"
        return report

    async def _find(self, wanted: Wanted) -> list[Dataset]:
        attempt = 0
        while True:
            try:
                return await asyncio.to_thread(self.client.find_studies, wanted.find_keys())
            except PacsError as exc:
                if not exc.transient or attempt >= self.request.retries:
                    raise
            await asyncio.sleep(self.request.retry_delay * 2**attempt)
            attempt += 1

    async def _study(self, uid: str, report: WantedReport) -> None:
        """Move or get one study, retried while the failures are transient; add up."""
        report.study_uids.append(self.services.keys.uid(self.site.siteid, uid))
        stored_before = 0
        for attempt in range(self.request.retries + 1):
            report.attempts += 1
            transfer: Transfer | None = None
            error: PacsError | None = None
            try:
                transfer, counts = await self._transfer(uid)
            except PacsError as exc:
                error, counts = exc, await self._counts(uid)
            if transfer is not None and transfer.status == MOVE_DESTINATION_UNKNOWN:
                raise ToolError(
                    f"the PACS does not know the move destination {self.destination}: add it "
                    "(with this host and --listen-port) to the PACS's configuration, or use "
                    "--method get"
                )
            stored_before += counts.stored
            if attempt == self.request.retries or not worth_retrying(transfer, counts, error):
                break
            log.info("transient failure, trying the study again")
            await asyncio.sleep(self.request.retry_delay * 2**attempt)
        report.stored += stored_before
        # what earlier attempts stored comes back as already stored in the last one
        report.duplicates += max(0, counts.duplicates - (stored_before - counts.stored))
        report.refused += counts.refused
        report.failed += counts.failed
        if transfer is not None:
            report.moved += transfer.completed + transfer.warning
            report.failed += max(0, transfer.failed - counts.refused - counts.failed)
        if error is not None:
            report.error = str(error)

    async def _counts(self, uid: str) -> StudyCounts:
        if self.session is None:
            return self._get_counts.frozen()
        return await self.services.sessions.counts(self.session, uid)

    async def _transfer(self, uid: str) -> tuple[Transfer, StudyCounts]:
        if self.session is not None:
            await self.services.sessions.expect(self.session, [uid])
            transfer = await asyncio.to_thread(self.client.move_study, uid, self.destination)
            return transfer, await self._counts(uid)
        self._get_counts = _Counts()
        loop = asyncio.get_running_loop()
        classes = self.config.site_named(self.site.name).sop_classes
        transfer = await asyncio.to_thread(
            self.client.get_study, uid, classes,
            lambda data: asyncio.run_coroutine_threadsafe(self._store(data), loop).result(),
        )
        return transfer, self._get_counts.frozen()

    async def _store(self, data: bytes) -> int:
        """One object of a C-GET through ingest; its C-STORE status."""
        counts = self._get_counts
        try:
            result = await self.services.ingest.store(
                data, self.site.name, by=operator(), protocol="import-pacs",
            )
        except StorageUnavailable as exc:
            counts.failed += 1
            return exc.dimse_status
        except ArchiveError as exc:
            counts.refused += 1
            return exc.dimse_status
        except Exception as exc:
            log.error("C-GET object not stored: %s", type(exc).__name__)
            counts.failed += 1
            return OUT_OF_RESOURCES
        if result.duplicate:
            counts.duplicates += 1
        else:
            counts.stored += 1
        return result.warning or SUCCESS


async def import_from_pacs(
    config: Config, request: PacsImportRequest, out: TextIO, report_path: Path | None
) -> list[WantedReport]:
    """Import what `request` asks for; one line per request on `out` (tab-separated) and in
    the report file (JSON), progress and a summary on stderr."""
    config.site_named(request.site)  # an unknown site fails before anything starts
    report = report_path.open("w", encoding="utf-8") if report_path is not None else None
    reports: list[WantedReport] = []
    started = time.monotonic()
    try:
        async with archive_services(config) as services:
            run = PacsImport(config, services, request)
            async with run.receiving():
                print(_HEADER, file=out, flush=True)
                with tqdm(total=len(request.wanted), desc="importing", unit="query",
                          file=sys.stderr, disable=None) as bar:  # None: on a terminal only
                    for wanted in request.wanted:
                        try:
                            reports.append(await run.one(wanted))
                        except ToolError as exc:  # the whole import cannot go on
                            reports.append(WantedReport(wanted.label, wanted.kind, "failed",
                                                        error=str(exc)))
                            _reported(reports[-1], out, report)
                            raise
                        _reported(reports[-1], out, report)
                        bar.update(1)
                        bar.set_postfix_str(_progress(reports, started), refresh=False)
    finally:
        if report is not None:
            report.close()
    for line in _summary(reports):
        print(line, file=sys.stderr)
    return reports


def _reported(item: WantedReport, out: TextIO, report: TextIO | None) -> None:
    tqdm.write(item.line(), file=out)
    out.flush()
    if report is not None:
        report.write(json.dumps(asdict(item)) + "\n")
        report.flush()


def _progress(reports: list[WantedReport], started: float) -> str:
    stored = sum(r.stored for r in reports)
    received = stored + sum(r.duplicates + r.refused for r in reports)
    rate = received / max(time.monotonic() - started, 1e-6)
    return (f"studies {sum(r.studies for r in reports)}, stored {stored}, already "
            f"{sum(r.duplicates for r in reports)}, refused {sum(r.refused for r in reports)}, "
            f"failed {sum(r.failed for r in reports)}, {rate:.1f} objects/s")


def _summary(reports: list[WantedReport]) -> list[str]:
    by_outcome = {o: sum(r.outcome == o for r in reports)
                  for o in ("imported", "incomplete", "not found", "failed")}
    return [
        *(f"{outcome}: {count}" for outcome, count in by_outcome.items()),
        f"studies: {sum(r.studies for r in reports)}",
        f"objects stored: {sum(r.stored for r in reports)}",
        f"objects already stored: {sum(r.duplicates for r in reports)}",
        f"objects refused: {sum(r.refused for r in reports)}",
        f"objects failed: {sum(r.failed for r in reports)}",
    ]
