"""The archive's services in-process, for the commands that write (the imports): the index (a
running archive's adopted, else started for the command), the configured sites, ingest (with
the configured workers), query, retrieve, import sessions and the audit trail."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ricord_archive.archive import ingest_executor, open_index
from ricord_archive.audit import NO_AUDIT, Actor, AuditTrail
from ricord_archive.blobstore import open_blob_store
from ricord_archive.config import Config
from ricord_archive.deid import Keyring
from ricord_archive.imports import ImportSessions
from ricord_archive.index.audit import AuditWriter
from ricord_archive.index.database import Pool
from ricord_archive.index.store import Site, SiteConflict, ensure_site
from ricord_archive.ingest import IngestService, IngestSettings
from ricord_archive.query import QueryService
from ricord_archive.rebuild import record_sites
from ricord_archive.retrieve import RetrieveService
from ricord_archive.secret import load_secret
from ricord_archive.tools import ToolError


@dataclass(frozen=True)
class ArchiveServices:
    pool: Pool
    keys: Keyring
    sites: dict[str, Site]
    ingest: IngestService
    query: QueryService
    retrieve: RetrieveService
    sessions: ImportSessions
    audit: AuditTrail = NO_AUDIT


def operator() -> Actor:
    """Who runs a command: the operating-system user on this host."""
    return Actor(getpass.getuser(), "operator", None, socket.gethostname())


@contextlib.asynccontextmanager
async def archive_services(config: Config) -> AsyncIterator[ArchiveServices]:
    async with open_index(config) as pool:
        keys = Keyring(load_secret(config))
        try:
            async with pool.acquire() as conn:
                sites = {s.name: await ensure_site(conn, s) for s in config.sites}
        except SiteConflict as exc:
            raise ToolError(str(exc)) from exc
        blobs = open_blob_store(config)
        await record_sites(blobs, sites.values())
        executor = ingest_executor(config)
        writer = AuditWriter(pool) if config.audit else None
        if writer is not None:
            writer.start()
        try:
            yield ArchiveServices(
                pool, keys, sites,
                IngestService(pool, blobs, keys, sites, IngestSettings.of(config), executor),
                QueryService(pool, config.limits.qido_max_limit), RetrieveService(pool, blobs),
                ImportSessions(pool, keys), writer or NO_AUDIT,
            )
        finally:
            if executor is not None:
                await asyncio.to_thread(executor.shutdown, True, cancel_futures=True)
            if writer is not None:
                await writer.stop()
