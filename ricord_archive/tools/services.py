"""The archive's services in-process, for the commands that write (the imports): the index (a
running archive's adopted, else started for the command) and the services `serve` builds too
(`archive.compose_services`)."""

from __future__ import annotations

import contextlib
import getpass
import socket
from collections.abc import AsyncIterator

from ricord_archive.archive import ArchiveServices, compose_services, open_index
from ricord_archive.audit_trail import Actor
from ricord_archive.config import Config
from ricord_archive.deid import Keyring
from ricord_archive.index.store import SiteConflict
from ricord_archive.runtime.secret import load_secret
from ricord_archive.tools import ToolError

__all__ = ["ArchiveServices", "archive_services", "operator"]


def operator() -> Actor:
    """Who runs a command: the operating-system user on this host."""
    return Actor(getpass.getuser(), "operator", None, socket.gethostname())


@contextlib.asynccontextmanager
async def archive_services(config: Config) -> AsyncIterator[ArchiveServices]:
    async with open_index(config) as pool, contextlib.AsyncExitStack() as stack:
        keys = Keyring(load_secret(config))
        try:
            services = await stack.enter_async_context(compose_services(config, pool, keys))
        except SiteConflict as exc:
            raise ToolError(str(exc)) from exc
        yield services
