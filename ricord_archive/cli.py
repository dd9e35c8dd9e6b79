"""The `ricord-archive` command: serve, migrate, db-url, and the offline tools deid, lookup,
refusals."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from ricord_archive import __version__
from ricord_archive.config import Config, ConfigError, load_config
from ricord_archive.dicom_io import configure_pydicom
from ricord_archive.index.embedded import EmbeddedPostgres, EmbeddedPostgresError
from ricord_archive.index.migrate import MigrationError

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
        "--csv a PatientID,pseudonym CSV on standard output.",
    )
    common(lookup)
    lookup.add_argument("--site", required=True, help="the configured site of the patients")
    lookup.add_argument("--csv", metavar="FILE", type=Path,
                        help="CSV file with a PatientID column in its header row ('-': stdin)")
    lookup.add_argument("patient_ids", metavar="PATIENT_ID", nargs="*")

    common(commands.add_parser("refusals", help="print refused objects per site and reason"))
    return parser


def _config(args: argparse.Namespace) -> Config:
    overrides = {
        "data_dir": args.data_dir,
        "database_url": args.database_url,
        "http_host": getattr(args, "http_host", None),
        "http_port": getattr(args, "http_port", None),
        "dimse_host": getattr(args, "dimse_host", None),
        "dimse_port": getattr(args, "dimse_port", None),
        "ae_title": getattr(args, "ae_title", None),
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
            asyncio.run(lookup(config, args.site, args.patient_ids, args.csv, sys.stdout))
        else:
            asyncio.run(print_refusals(config, sys.stdout))
    except ToolError as exc:
        log.error("%s", exc)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "lookup" and bool(args.csv) == bool(args.patient_ids):
        parser.error("lookup takes PATIENT_ID arguments or --csv FILE (one of them)")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    configure_pydicom()
    try:
        config = _config(args)
        if args.command == "db-url":
            return _db_url(config)
        if args.command == "migrate":
            asyncio.run(_migrate(config))
            return 0
        if args.command in ("deid", "lookup", "refusals"):
            return _run_tool(config, args)
        from ricord_archive.archive import serve

        asyncio.run(serve(config))
        return 0
    except (ConfigError, MigrationError, EmbeddedPostgresError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
