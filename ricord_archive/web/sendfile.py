"""Stored bytes of a local file to an HTTP client by sendfile, with a send deadline."""

from __future__ import annotations

import asyncio
import logging
from typing import BinaryIO

from aiohttp import web

from ricord_archive.web import context

log = logging.getLogger(__name__)

_SENDFILE_CHUNK = 4 * 1024 * 1024  # sent within send_timeout, or the client is cut off


async def sendfile(request: web.Request, handle: BinaryIO, base: int, size: int) -> None:
    """`size` bytes of the file from `base` (where the blob starts in it) to the client by
    sendfile, in chunks each of which must go out within the send timeout: sendfile bypasses
    the transport's buffer, so the connection's own send deadline does not see a client that
    stopped reading. A HEAD request gets no body."""
    if request.method == "HEAD":
        return
    loop = asyncio.get_running_loop()
    timeout = request.app[context.SERVICES].send_timeout
    for offset in range(0, size, _SENDFILE_CHUNK):
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("the client went away")
        try:
            async with asyncio.timeout(timeout):
                await loop.sendfile(transport, handle, base + offset,
                                    min(_SENDFILE_CHUNK, size - offset))
        except TimeoutError:
            log.warning("closed an HTTP connection from %s: the client read nothing for %g s",
                        request.remote, timeout)
            transport.abort()
            raise ConnectionResetError("the client stopped reading") from None
