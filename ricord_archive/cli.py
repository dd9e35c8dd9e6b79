"""The `ricord-archive` command: serve, migrate, db-url, the offline tools deid, lookup,
refusals, audit, and the imports (files, and studies out of a PACS)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ricord_archive import __version__
from ricord_archive.config import Config, ConfigError, load_config
from ricord_archive.dicom.io import configure_pydicom
from ricord_archive.index.embedded import EmbeddedPostgres, EmbeddedPostgresError
from ricord_archive.index.migrate import MigrationError
from ricord_archive.runtime import logs, metrics_dir

log = logging.getLogger("ricord_archive")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ricord-archive", description="A de-identifying DICOMweb and DIMSE research archive."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--config", type=Path, help="TOML configuration file")
        sub.add_argument("--data-dir", type=Path, help="data directory (default ./data)")
        sub.add_argument("--database-url", help="PostgreSQL URL (default: embedded PostgreSQL)")

    serve = commands.add_parser("serve", help="run the archive")
    common(serve)
    serve.add_argument("--http-host", help="HTTP listen address (default 127.0.0.1)")
    serve.add_argument("--http-port", type=int, help="HTTP port (default 8042)")
    serve.add_argument("--dimse-host", help="DIMSE listen address (default 127.0.0.1)")
    serve.add_argument("--dimse-port", type=int, help="DIMSE port (default 11112)")
    serve.add_argument("--ae-title", help="the archive's AE title (default RICORD)")
    serve.add_argument("--read-database-url",
                       help="PostgreSQL URL of a read replica for queries and metadata")
    serve.add_argument("--processes", type=int, choices=range(0, 65), metavar="N",
                       help="server processes sharing the ports (default: one per CPU)")
    serve.add_argument("--worker-of", type=int, help=argparse.SUPPRESS)  # set by the primary
    serve.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)  # set by the primary
    common(commands.add_parser("migrate", help="apply database migrations and exit"))
    common(commands.add_parser("db-url", help="print the URL of the archive's database"))

    deid = commands.add_parser(
        "deid", help="de-identify files offline exactly as ingest would (a dry run)",
        description="De-identify a DICOM file or a folder (recursively) with the ingest rules, "
        "without storing anything. Known patients get their pseudonyms; others get provisional "
        "<SITEID>-DRYRUN-<n> ones. Refused and unreadable files are listed and not written.",
    )
    common(deid)
    deid.add_argument("--site", required=True, help="the configured site the files come from")
    deid.add_argument("source", metavar="IN", type=Path, help="a DICOM file or a folder")
    deid.add_argument("target", metavar="OUT", type=Path,
                      help="output file or folder (mirrors IN's folder structure)")

    lookup = commands.add_parser(
        "lookup", help="print the pseudonyms of original patient IDs at a site",
        description="Print PATIENT_ID<TAB>pseudonym (or 'not found') for each ID, or with "
        "--csv a PatientID,pseudonym CSV on standard output (PatientID,IssuerOfPatientID,"
        "pseudonym when the file has an IssuerOfPatientID column).",
    )
    common(lookup)
    lookup.add_argument("--site", required=True, help="the configured site of the patients")
    lookup.add_argument("--csv", metavar="FILE", type=Path,
                        help="CSV file with a PatientID column in its header row ('-': stdin), "
                        "and optionally an IssuerOfPatientID column")
    lookup.add_argument("--issuer", default="", metavar="ISSUER",
                        help="the IssuerOfPatientID of the PATIENT_IDs (default: none, so the "
                        "site's default_issuer if it has one)")
    lookup.add_argument("patient_ids", metavar="PATIENT_ID", nargs="*")

    common(commands.add_parser("refusals", help="print refused objects per site and reason"))
    fsck = commands.add_parser(
        "fsck", help="check the blob store against the index (orphans, missing blobs)"
    )
    common(fsck)
    fsck.add_argument("--repair", action="store_true",
                      help="remove orphan blobs and partial writes older than an hour")
    common(commands.add_parser(
        "rebuild-index", help="re-create a lost index from the blob store (into an empty index)",
        description="Index every object of the blob store again, with the sites and patients "
        "of the allocation records kept beside the blobs. The index must be empty (a new "
        "database, or the embedded one removed); the archive must not be running.",
    ))
    _import_parsers(commands, common)
    _audit_parser(commands, common)
    _clinical_parser(commands, common)
    _labels_parser(commands, common)
    _cohort_parser(commands)
    return parser


def _cohort_parser(commands: argparse._SubParsersAction) -> None:
    cohort = commands.add_parser(
        "cohort", help="create, list and download cohorts of a running archive (over HTTP)")
    actions = cohort.add_subparsers(dest="cohort_command", required=True)

    def http(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--url", default=os.environ.get("RICORD_URL", "http://127.0.0.1:8042"),
                         help="the archive (default $RICORD_URL or http://127.0.0.1:8042)")
        sub.add_argument("--token", default=os.environ.get("RICORD_TOKEN"),
                         help="bearer token (default $RICORD_TOKEN)")

    create = actions.add_parser(
        "create", help="freeze the series matching the filters into a cohort",
        description="Filters are QIDO-RS keys at study and series level (Modality=CT, "
        "StudyDate=20200101-20201231, ModalitiesInStudy=CT, ClinicalTrialSiteID=...) and "
        "clinical columns (TestResult=POSITIVE, Age=18-65). Prints the cohort as JSON.")
    http(create)
    create.add_argument("--name", required=True)
    create.add_argument("--description", default="")
    create.add_argument("--license", default="", help="the text of LICENSE.txt")
    create.add_argument("--citation", default="", help="the text of CITATION.txt")
    create.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                        dest="filters")
    http(actions.add_parser("list", help="list the cohorts"))
    download = actions.add_parser(
        "download", help="download a cohort's ZIP, resuming a partial one, checking every file",
        description="Writes OUT.part while downloading (resumed with HTTP Range after an "
        "interruption), then checks each file against the size and SHA-256 the archive "
        "lists, and renames it OUT.")
    http(download)
    download.add_argument("cohort_id", metavar="ID", type=int)
    download.add_argument("out", metavar="OUT", type=Path, help="the ZIP file to write")
    download.add_argument("--retries", type=int, default=20, metavar="N",
                          help="tries again after this many interruptions in a row (default 20)")
    download.add_argument("--limit-rate", type=_positive, metavar="BYTES_PER_SECOND",
                          help="download at most this fast on average")


def _clinical_parser(
    commands: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]
) -> None:
    clinical = commands.add_parser("clinical", help="clinical data around the images")
    actions = clinical.add_subparsers(dest="clinical_command", required=True)
    sheet = actions.add_parser(
        "import", help="import a site's clinical sheet (CSV or .xlsx)",
        description="Import one row per examination: PatientID (or MRN), optional "
        "IssuerOfPatientID, AccessionNumber or StudyInstanceUID, StudyDate, and the clinical "
        "columns Age, Sex, TestMethod, TestResult, TestDate and those --columns declares. "
        "Identifiers and dates are keyed and shifted as for the images; the file is not kept. "
        "Exit status 1 when some rows were refused.",
    )
    common(sheet)
    sheet.add_argument("--site", required=True, help="the configured site of the sheet")
    sheet.add_argument("--sheet", help="the workbook's sheet (default: the first)")
    sheet.add_argument("--columns", type=Path, metavar="MAP.toml",
                       help="declare other columns: [columns.NAME] type = number (unit = ...), "
                       "category (values = [...]), boolean or date")
    sheet.add_argument("file", metavar="FILE", type=Path, help="a .csv or .xlsx file")


def _labels_parser(
    commands: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]
) -> None:
    labels = commands.add_parser("labels", help="expert labels on the images (MD.ai)")
    actions = labels.add_subparsers(dest="labels_command", required=True)
    schema = actions.add_parser(
        "init-schema", help="load a labelling schema shipped with the archive",
        description="Load the label groups and labels (with their codes) of a shipped schema; "
        "loading it again changes nothing.")
    common(schema)
    schema.add_argument("name", choices=("ricord",), help="the schema")
    imported = actions.add_parser(
        "import", help="import an MD.ai JSON export (labels and annotations)",
        description="Import MD.ai's export: its label groups and labels, and its annotations on "
        "images the archive holds (others are counted and listed by position, not stored). "
        "Readers become keyed codes R-XXXXXXXX; notes are dropped unless --keep-notes. "
        "Importing a file again changes nothing. Exit status 1 when some annotations were "
        "not stored.")
    common(imported)
    imported.add_argument("--keep-notes", action="store_true",
                          help="keep the annotations' free-text notes (dropped by default)")
    imported.add_argument("--dicom", action="store_true",
                          help="then publish the examinations' labels as DICOM SEG and SR")
    imported.add_argument("file", metavar="FILE.json", type=Path, help="MD.ai's JSON export")
    to_dicom = actions.add_parser(
        "to-dicom", help="publish the labels as DICOM SEG (local) and SR (global) objects",
        description="Build each reader's SEG of a series and SR of an examination from the "
        "stored annotations and store them in the archive; publishing again replaces them.")
    common(to_dicom)
    to_dicom.add_argument("--study", action="append", metavar="UID",
                          help="only this examination (StudyInstanceUID; repeatable)")


def _audit_parser(
    commands: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]
) -> None:
    audit = commands.add_parser(
        "audit", help="print the audit trail (associations, stores, queries, retrievals, "
        "refused accesses)",
        description="Print the latest audit events that pass the filters, oldest first: a "
        "table, or one JSON object a line with --json.",
    )
    common(audit)
    audit.add_argument("--since", metavar="ISO", help="from this date or time (ISO 8601)")
    audit.add_argument("--until", metavar="ISO", help="before this date or time (ISO 8601)")
    audit.add_argument("--action", help="an EventActionCode (C, R, U, D, E), an EventID code "
                       "(e.g. 110112) or its meaning (e.g. Query)")
    audit.add_argument("--who", help="a token's name or a calling AE title")
    audit.add_argument("--outcome", help="0, 4, 8, 12 or success, minor, serious, major")
    audit.add_argument("--limit", type=_positive, default=100,
                       help="at most this many events, the latest (default 100)")
    audit.add_argument("--json", action="store_true", help="JSON lines instead of a table")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _port_number(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError("must be a port number (1-65535)")
    return value


def _import_parsers(
    commands: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]
) -> None:
    files = commands.add_parser(
        "import", help="import DICOM files, folders, DICOMDIRs and zip files into a site",
        description="Store DICOM files through the archive's ingest pipeline (de-identified as "
        "over DIMSE or STOW-RS) for a site: files, folders (recursively), DICOMDIRs (the files "
        "they reference) and zip files. Re-running stores nothing new; --resume skips the "
        "files a previous report lists unchanged. Exit status 1 when some files failed "
        "(the index or disk was unavailable: run again).",
    )
    common(files)
    files.add_argument("--site", required=True, help="the configured site the files come from")
    files.add_argument("--report", type=Path, metavar="FILE",
                       help="write one JSON line per file (path, outcome, reason, SOP Instance "
                       "UID)")
    files.add_argument("--resume", type=Path, metavar="REPORT",
                       help="skip the files a previous --report lists with the same path, size "
                       "and modification time (except failed ones)")
    files.add_argument("--jobs", type=_positive, default=4,
                       help="objects in flight at once (default 4)")
    files.add_argument("paths", metavar="PATH", type=Path, nargs="+")

    pacs = commands.add_parser(
        "import-pacs", help="import studies from a PACS by accession number or patient",
        description="Find studies in a PACS (C-FIND, keeping exact matches only) and move them "
        "into the archive for a site (C-MOVE to the archive's AE title, received by this "
        "command's own listener, or by the running archive when the port is taken), or fetch "
        "them (--method get). One tab-separated line per request on standard output. Exit "
        "status 1 when some request failed or is incomplete.",
    )
    common(pacs)
    pacs.add_argument("--site", required=True, help="the configured site the studies go to")
    pacs.add_argument("--pacs", required=True, metavar="AET@HOST:PORT", help="the PACS")
    pacs.add_argument("--accessions", type=Path, metavar="FILE",
                      help="accession numbers: a text file, one a line, or a CSV file with an "
                      "AccessionNumber column ('-': standard input)")
    pacs.add_argument("--accession", action="append", default=[], metavar="ACCESSION",
                      help="an accession number (repeatable)")
    pacs.add_argument("--patient-id", metavar="ID", help="all studies of this patient")
    pacs.add_argument("--date-range", metavar="A-B",
                      help="with --patient-id: StudyDate YYYYMMDD-YYYYMMDD (either side open)")
    pacs.add_argument("--method", choices=("move", "get"), default="move",
                      help="C-MOVE to the archive (default) or C-GET, for a PACS that cannot "
                      "reach the archive")
    pacs.add_argument("--listen-port", type=_port_number, metavar="PORT",
                      help="move: where the archive receives (default: the DIMSE port)")
    pacs.add_argument("--move-destination", metavar="AET",
                      help="move: the archive's AE title in the PACS (default: --ae-title)")
    pacs.add_argument("--calling-aet", metavar="AET",
                      help="our AE title towards the PACS (default: --ae-title)")
    pacs.add_argument("--pacs-calling-aet", metavar="AET",
                      help="move: the AE title the PACS sends from (default: the one in --pacs)")
    pacs.add_argument("--ae-title", help="the archive's AE title (default RICORD)")
    pacs.add_argument("--retries", type=int, choices=range(0, 11), default=2, metavar="N",
                      help="tries again after transient failures, 0-10 (default 2)")
    pacs.add_argument("--report", type=Path, metavar="FILE",
                      help="write one JSON line per request")


def _config(args: argparse.Namespace) -> Config:
    overrides = {
        "data_dir": args.data_dir,
        "database_url": args.database_url,
        "http_host": getattr(args, "http_host", None),
        "http_port": getattr(args, "http_port", None),
        "dimse_host": getattr(args, "dimse_host", None),
        "dimse_port": getattr(args, "dimse_port", None),
        "ae_title": getattr(args, "ae_title", None),
        "processes": getattr(args, "processes", None),
        "read_database_url": getattr(args, "read_database_url", None),
    }
    return load_config(args.config, overrides=overrides)


async def _migrate(config: Config) -> None:
    from ricord_archive.archive import open_index

    async with open_index(config):
        pass


def _db_url(config: Config) -> int:
    if config.database_url:
        print(config.database_url)
        return 0
    url = EmbeddedPostgres(config.data_dir / "pg").current_url()
    if url is None:
        print(f"no embedded PostgreSQL is running for {config.data_dir}", file=sys.stderr)
        return 1
    print(url)
    return 0


def _run_tool(config: Config, args: argparse.Namespace) -> int:
    from ricord_archive.tools import ToolError
    from ricord_archive.tools.dry_run import deidentify_files
    from ricord_archive.tools.lookup import lookup
    from ricord_archive.tools.refusals import print_refusals

    try:
        if args.command == "deid":
            asyncio.run(deidentify_files(config, args.site, args.source, args.target))
        elif args.command == "lookup":
            asyncio.run(lookup(config, args.site, args.patient_ids, args.csv, sys.stdout,
                               args.issuer))
        else:
            asyncio.run(print_refusals(config, sys.stdout))
    except ToolError as exc:
        log.error("%s", exc)
        return 2
    return 0


async def _rebuild_index(config: Config) -> int:
    """Exit 0 when every blob was indexed, 1 when some could not be read."""
    from ricord_archive.archive import open_index
    from ricord_archive.blobstore import open_blob_store
    from ricord_archive.index.facade import Index
    from ricord_archive.services.rebuild import RebuildError, rebuild_index

    async with open_index(config) as pool:
        try:
            report = await rebuild_index(Index(pool), open_blob_store(config), config)
        except RebuildError as exc:
            log.error("%s", exc)
            return 2
    print("\n".join(report.lines()))
    return 1 if report.unreadable else 0


async def _fsck(config: Config, repair: bool) -> int:
    """Exit 0 when the blob store and the index agree, 1 when something is reported."""
    from ricord_archive.archive import open_index
    from ricord_archive.blobstore import open_blob_store
    from ricord_archive.index.facade import Index
    from ricord_archive.services.fsck import check
    from ricord_archive.services.fsck import repair as remove_orphans

    blobs = open_blob_store(config)
    async with open_index(config, create=False) as pool:
        report = await check(Index(pool), blobs)
    print("\n".join(report.lines()))
    if repair:
        removed = await remove_orphans(blobs, report)
        print(f"removed {removed} files")
        report.orphan_blobs, report.partial_writes = [], []
    return 0 if report.clean else 1


def _audit(config: Config, args: argparse.Namespace) -> int:
    from ricord_archive.index.audit_rows import AuditFilter
    from ricord_archive.tools import ToolError
    from ricord_archive.tools.audit_report import (
        parse_action,
        parse_outcome,
        parse_time,
        print_audit,
    )

    try:
        wanted = AuditFilter(
            since=parse_time(args.since) if args.since else None,
            until=parse_time(args.until) if args.until else None,
            who=args.who, outcome=parse_outcome(args.outcome) if args.outcome else None,
            limit=args.limit, **(parse_action(args.action) if args.action else {}),
        )
        asyncio.run(print_audit(config, wanted, args.json, sys.stdout))
    except ToolError as exc:
        log.error("%s", exc)
        return 2
    return 0


def _import_files(config: Config, args: argparse.Namespace) -> int:
    from ricord_archive.tools import ToolError
    from ricord_archive.tools.import_files import import_files

    try:
        summary = asyncio.run(import_files(
            config, args.site, args.paths, args.report, args.resume, args.jobs
        ))
    except ToolError as exc:
        log.error("%s", exc)
        return 2
    return 1 if summary.outcomes["failed"] else 0


def _import_pacs(config: Config, args: argparse.Namespace) -> int:
    from ricord_archive.dimse.client import PacsAddress
    from ricord_archive.tools import ToolError
    from ricord_archive.tools.import_pacs import (
        PacsImportRequest,
        import_from_pacs,
        read_accessions,
        wanted_list,
    )

    try:
        pacs = PacsAddress.parse(args.pacs)
    except ValueError as exc:
        log.error("--pacs: %s", exc)
        return 2
    try:
        accessions = [*(read_accessions(args.accessions) if args.accessions else []),
                      *args.accession]
        request = PacsImportRequest(
            site=args.site, pacs=pacs,
            wanted=wanted_list(accessions, args.patient_id, args.date_range),
            method=args.method, listen_port=args.listen_port, calling_aet=args.calling_aet,
            move_destination=args.move_destination, pacs_calling_aet=args.pacs_calling_aet,
            retries=args.retries,
        )
        reports = asyncio.run(import_from_pacs(config, request, sys.stdout, args.report))
    except ToolError as exc:
        log.error("%s", exc)
        return 2
    return 1 if any(r.outcome in ("failed", "incomplete") for r in reports) else 0


def _import_clinical(config: Config, args: argparse.Namespace) -> int:
    from ricord_archive.tools import ToolError
    from ricord_archive.tools.clinical import import_clinical

    try:
        summary = asyncio.run(import_clinical(
            config, args.site, args.file, args.sheet, args.columns, sys.stdout
        ))
    except ToolError as exc:
        log.error("%s", exc)
        return 2
    return 1 if summary.refusals else 0


def _cohort(args: argparse.Namespace) -> int:
    from ricord_archive.tools import ToolError
    from ricord_archive.tools import cohort_client as client

    api = client.Api(args.url, args.token)
    try:
        if args.cohort_command == "create":
            filters = dict(f.split("=", 1) for f in args.filters if "=" in f)
            if len(filters) != len(args.filters):
                raise ToolError("a filter is KEY=VALUE")
            print(json.dumps(client.create(api, args.name, filters, args.description,
                                           args.license, args.citation), indent=2))
        elif args.cohort_command == "list":
            client.print_cohorts(api, sys.stdout)
        else:
            client.download(api, args.cohort_id, args.out, args.retries, args.limit_rate)
    except ToolError as exc:
        log.error("%s", exc)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "lookup" and bool(args.csv) == bool(args.patient_ids):
        parser.error("lookup takes PATIENT_ID arguments or --csv FILE (one of them)")
    if args.command == "lookup" and args.csv and args.issuer:
        parser.error("lookup --issuer goes with PATIENT_ID arguments; a CSV file names issuers "
                     "in an IssuerOfPatientID column")
    logging.basicConfig(level=logging.INFO, format=logs.TEXT_FORMAT)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    configure_pydicom()
    if args.command == "cohort":
        return _cohort(args)
    try:
        config = _config(args)
        logs.use_format(config.log_format)
        if args.command == "db-url":
            return _db_url(config)
        if args.command == "migrate":
            asyncio.run(_migrate(config))
            return 0
        if args.command == "import":
            return _import_files(config, args)
        if args.command == "import-pacs":
            return _import_pacs(config, args)
        if args.command == "audit":
            return _audit(config, args)
        if args.command == "clinical":
            return _import_clinical(config, args)
        if args.command == "labels":
            from ricord_archive.tools.labels import run as run_labels

            return run_labels(config, args)
        if args.command == "fsck":
            return asyncio.run(_fsck(config, args.repair))
        if args.command == "rebuild-index":
            return asyncio.run(_rebuild_index(config))
        if args.command in ("deid", "lookup", "refusals"):
            return _run_tool(config, args)
        if config.metrics.enabled:  # before the metrics are first imported
            metrics_dir.use(config.data_dir, primary=args.worker_of is None)
        from ricord_archive.archive import serve

        asyncio.run(serve(config, args.worker_of, args.ready_fd))
        return 0
    except (ConfigError, MigrationError, EmbeddedPostgresError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
