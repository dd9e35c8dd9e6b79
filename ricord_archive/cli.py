"""The `ricord-archive` command: serve, migrate, db-url."""

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
    from ricord_archive.archive import database, prepare_data_dir

    prepare_data_dir(config)
    embedded_running = (
        config.database_url is None
        and EmbeddedPostgres(config.data_dir / "pg").current_url() is not None
    )
    async with database(config, stop_embedded=not embedded_running):
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
        from ricord_archive.archive import serve

        asyncio.run(serve(config))
        return 0
    except (ConfigError, MigrationError, EmbeddedPostgresError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
