"""Assembling and running the archive: database, services, HTTP and DIMSE listeners."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from aiohttp import web

from ricord_archive.audit_trail import NO_AUDIT, AuditTrail
from ricord_archive.blobstore import BlobStore, open_blob_store
from ricord_archive.config import Config
from ricord_archive.deid import Keyring
from ricord_archive.dicom.io import configure_pydicom
from ricord_archive.dimse.server import REJECTION_REASONS, DimseServer
from ricord_archive.index.audit_rows import AuditWriter
from ricord_archive.index.database import Pool, create_pool, ensure_database
from ricord_archive.index.embedded import EmbeddedPostgres, EmbeddedPostgresError
from ricord_archive.index.facade import Index
from ricord_archive.index.migrate import check_partitions, migrate
from ricord_archive.index.replica import Reads
from ricord_archive.index.replica import reads as replica_reads
from ricord_archive.index.store import Site
from ricord_archive.runtime import metrics
from ricord_archive.runtime.processes import (
    Workers,
    become_worker_of,
    process_count,
    tell_primary_ready,
)
from ricord_archive.runtime.readiness import Readiness
from ricord_archive.runtime.secret import load_secret
from ricord_archive.services.clinical import ClinicalService
from ricord_archive.services.cohorts import CohortService
from ricord_archive.services.fsck import collect_orphans, report_at_start
from ricord_archive.services.import_sessions import ImportSessions
from ricord_archive.services.ingest import IngestService, IngestSettings
from ricord_archive.services.labels import LabelService
from ricord_archive.services.query import QueryService
from ricord_archive.services.rebuild import record_sites
from ricord_archive.services.retrieve import RetrieveService
from ricord_archive.web.app import Services, create_app
from ricord_archive.web.auth import Authenticator
from ricord_archive.web.listener import Deadlines, listen, tls_context
from ricord_archive.web.oidc import OidcVerifier
from ricord_archive.web.ops import metrics_app

log = logging.getLogger(__name__)
_WORKERS_START_TIMEOUT = 120  # seconds the primary waits for its workers to listen


def prepare_data_dir(config: Config) -> None:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    config.data_dir.chmod(0o700 | 0o001)  # o+x only: the embedded PostgreSQL's user passes


@contextlib.asynccontextmanager
async def database(config: Config, *, stop_embedded: bool = True,
                   primary: bool = True) -> AsyncIterator[Pool]:
    """A migrated connection pool: to the configured server, or to the embedded cluster,
    started (or adopted) for the duration and stopped afterwards when `stop_embedded`. The
    `primary` process (not a server's worker process) warns of a configured partition count
    the index does not have."""
    embedded = None
    url = config.database_url
    if url is None:
        embedded = EmbeddedPostgres(config.data_dir / "pg")
        url = await asyncio.to_thread(embedded.start)
        await ensure_database(url)
    try:
        pool = await create_pool(url, max_size=config.db_pool_size)
        try:
            async with pool.acquire() as conn:
                await migrate(conn, instance_partitions=config.instance_partitions)
                if primary:
                    await check_partitions(conn, config.instance_partitions)
            yield pool
        finally:
            await pool.close()
    finally:
        if embedded is not None and stop_embedded:
            await asyncio.to_thread(embedded.stop)


@contextlib.asynccontextmanager
async def open_index(config: Config, *, create: bool = True) -> AsyncIterator[Pool]:
    """The index for a one-off command (migrate, the offline tools). An embedded PostgreSQL that
    a running archive uses is adopted and left running; otherwise it is started for the command
    and stopped afterwards. With `create=False` a data directory without a cluster is an error,
    not a new empty index."""
    embedded = None if config.database_url else EmbeddedPostgres(config.data_dir / "pg")
    if embedded is not None and not create and not (embedded.pgdata / "PG_VERSION").exists():
        raise EmbeddedPostgresError(
            f"no archive index under {config.data_dir}: start the archive there once first "
            "(ricord-archive serve), or give the right --data-dir or --database-url"
        )
    prepare_data_dir(config)
    adopted = embedded is not None and await asyncio.to_thread(embedded.current_url) is not None
    async with database(config, stop_embedded=not adopted) as pool:
        yield pool


@dataclass(frozen=True)
class ArchiveServices:
    """The services `serve` and the offline tools share, over one index and blob store."""

    index: Index
    keys: Keyring
    sites: dict[str, Site]
    blobs: BlobStore
    ingest: IngestService
    query: QueryService
    retrieve: RetrieveService
    sessions: ImportSessions
    audit: AuditTrail
    audit_writer: AuditWriter | None  # the trail's writer, when the trail is on


@contextlib.asynccontextmanager
async def compose_services(
    config: Config, pool: Pool, keys: Keyring, reads: Reads | None = None, *,
    primary: bool = True,
) -> AsyncIterator[ArchiveServices]:
    """The composition root: the configured sites (created in the index on first use; a
    `SiteConflict` when a pinned SITEID contradicts it), the blob store (where the `primary`
    process records the sites), ingest (with the configured workers), query and retrieve (over
    `reads`, a read replica, when given), import sessions and the audit trail. On leaving, the
    ingest workers stop, then the audit trail writes what is left."""
    index = Index(pool, reads)
    sites = {s.name: await index.ensure_site(s) for s in config.sites}
    blobs = open_blob_store(config)
    if primary:
        await record_sites(blobs, sites.values())
    executor = ingest_executor(config)
    writer = AuditWriter(index.audit) if config.audit else None
    trail = writer or NO_AUDIT
    if writer is not None:
        writer.start()
    try:
        yield ArchiveServices(
            index, keys, sites, blobs,
            IngestService(index, blobs, keys, sites, IngestSettings.of(config), executor, trail),
            QueryService(index, config.limits.qido_max_limit),
            RetrieveService(index, blobs), ImportSessions(index, keys),
            trail, writer,
        )
    finally:
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, True, cancel_futures=True)
        if writer is not None:  # last: the records of what just finished
            await writer.stop()


@dataclass
class _Readiness:
    ready: bool = False

    def __call__(self) -> bool:
        return self.ready


def ingest_executor(config: Config) -> ProcessPoolExecutor | None:
    """Worker processes for de-identification when configured (`ingest_workers`), else None:
    threads of the server process. Measured here (bench/RESULTS.md): processes help several
    concurrent senders a little and slow one association down (two round trips per object).

    forkserver: workers do not inherit the server's sockets, threads or database pool."""
    if config.ingest_workers == 0:
        return None
    return ProcessPoolExecutor(
        max_workers=config.ingest_workers, mp_context=multiprocessing.get_context("forkserver"),
        initializer=configure_pydicom,
    )


async def serve(
    config: Config, worker_of: int | None = None, ready_fd: int | None = None
) -> None:
    """Run until SIGINT or SIGTERM, then stop listeners, the pool and the embedded database.

    The primary process also runs the other server processes (`processes`), which share its
    listening ports; a worker (`worker_of`: the primary's PID) serves on the primary's database,
    says on `ready_fd` when it listens, and leaves start-up checks to the primary."""
    if worker_of is not None:
        become_worker_of(worker_of)
    processes = 1 if worker_of is not None else process_count(config.processes)
    shared_ports = worker_of is not None or processes > 1
    prepare_data_dir(config)
    keys = Keyring(load_secret(config))
    tls = (tls_context(config.tls_cert, config.tls_key)
           if config.tls_cert and config.tls_key else None)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    readiness = _Readiness()
    async with (
        database(config, primary=worker_of is None) as pool,
        replica_reads(pool, config.read_database_url) as reads,
        compose_services(config, pool, keys, reads, primary=worker_of is None) as core,
    ):
        sites, blobs, ingest, query = core.sites, core.blobs, core.ingest, core.query
        trail, audit_writer = core.audit, core.audit_writer
        for site in sites.values():
            log.info("site %s has SITEID %s", site.name, site.siteid)
        site_ids = {name: site.id for name, site in sites.items()}
        oidc = config.auth.oidc
        services = Services(
            ingest=ingest, query=query, retrieve=core.retrieve,
            default_site=config.default_site.name,
            max_stow_bytes=config.limits.max_stow_bytes, ready=readiness,
            cors_origins=config.cors_origins,
            authenticator=Authenticator(
                config.auth.tokens, site_ids, OidcVerifier(oidc, site_ids) if oidc else None,
            ) if config.auth.enabled else None,
            trusted_proxies=config.trusted_proxies,
            body_idle_timeout=config.limits.http_body_idle_timeout,
            send_timeout=config.limits.http_send_timeout,
            audit=trail,
            cohorts=CohortService(core.index, blobs),
            clinical=ClinicalService(core.index, keys, ingest, trail),
            labels=LabelService(core.index, keys, trail),
            metrics=config.metrics.enabled and config.metrics.port is None,
            ready_checks=Readiness(pool, blobs, readiness).checks,
        )
        metrics.initialize(sites, REJECTION_REASONS)
        sampler = asyncio.create_task(metrics.sample(pool, reads, audit_writer))
        runner = web.AppRunner(create_app(services), access_log=None)
        await runner.setup()
        http = await listen(runner, config.http_host, config.http_port, Deadlines(
            config.limits.http_header_timeout, config.limits.http_send_timeout,
        ), tls, shared_ports)
        dimse = DimseServer(config, ingest, query, services.retrieve, core.sessions, trail)
        await dimse.start(shared_ports)
        if worker_of is not None:
            readiness.ready = True
            if ready_fd is not None:
                tell_primary_ready(ready_fd)
            try:
                await _serve_until(stop, readiness, dimse, http, runner)
            finally:
                sampler.cancel()
            return
        metrics_runner = await _metrics_listener(config)
        workers = None
        if processes > 1:
            workers = Workers(processes - 1, await _database_url(config),
                              config.limits.shutdown_grace, config.read_database_url)
            await workers.start(timeout=_WORKERS_START_TIMEOUT)
        readiness.ready = True
        fsck_at_start = asyncio.create_task(report_at_start(core.index, blobs))
        collector = asyncio.create_task(collect_orphans(
            core.index, blobs, config.limits.orphan_collect_interval, config.limits.orphan_grace
        ))
        if config.auth.enabled:
            log.warning(
                "AUTHENTICATION ENABLED: DICOMweb needs a bearer token (%d configured: %s%s); "
                "/health stays open", len(config.auth.tokens),
                ", ".join(f"{t.name}={t.role}" for t in config.auth.tokens),
                f"; OpenID Connect tokens of {oidc.issuer}" if oidc else "",
            )
        log.info(
            "ricord-archive ready: HTTP %s://%s:%d/dicom-web, DIMSE %s@%s:%d, %d process%s",
            "https" if tls else "http", config.http_host, config.http_port, config.ae_title,
            config.dimse_host, config.dimse_port, processes, "es" if processes > 1 else "",
        )
        try:
            await _serve_until(stop, readiness, dimse, http, runner, workers)
        finally:
            fsck_at_start.cancel()
            collector.cancel()
            sampler.cancel()
            if metrics_runner is not None:
                await metrics_runner.cleanup()


async def _serve_until(
    stop: asyncio.Event, readiness: _Readiness, dimse: DimseServer, http: asyncio.AbstractServer,
    runner: web.AppRunner, workers: Workers | None = None,
) -> None:
    """Serve until `stop`; then stop accepting and finish what is in progress (here and in the
    workers, at the same time). The ingest workers and the audit trail stop after this, when
    `compose_services` ends (the trail last: the records of what just finished)."""
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        readiness.ready = False
        http.close()  # no new connections; runner.cleanup() ends those open once idle
        await asyncio.gather(
            dimse.stop(), runner.cleanup(),
            *([workers.stop()] if workers is not None else []),
        )


async def _metrics_listener(config: Config) -> web.AppRunner | None:
    """`GET /metrics` on a port of its own when configured (the primary process answers for
    all: the metrics of every process are in the shared directory)."""
    if not config.metrics.enabled or config.metrics.port is None:
        return None
    runner = web.AppRunner(metrics_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, config.metrics.host, config.metrics.port).start()
    log.info("metrics at http://%s:%d/metrics", config.metrics.host, config.metrics.port)
    return runner


async def _database_url(config: Config) -> str:
    """The URL of the index this process uses, for its workers."""
    if config.database_url:
        return config.database_url
    url = await asyncio.to_thread(EmbeddedPostgres(config.data_dir / "pg").current_url)
    if url is None:
        raise EmbeddedPostgresError("the embedded PostgreSQL stopped unexpectedly")
    return url
