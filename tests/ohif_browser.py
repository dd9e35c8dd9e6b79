"""Debian's Chromium, headless, driven over the DevTools protocol (aiohttp's websocket client).

The browser gets a fresh profile, resolves no host name but loopback ones, and is stopped (its
own process, by id) when the context ends. Every network request of the page is recorded with
its outcome, so a test can require that each request to a server succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

T = TypeVar("T")

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-sync",
    "--disable-extensions",
    "--mute-audio",
    "--hide-scrollbars",
    "--window-size=1600,1000",
    # Nothing may leave loopback: every other host name is unresolvable.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
)
START_DEADLINE = 30.0
COMMAND_DEADLINE = 30.0


class BrowserError(RuntimeError):
    pass


def chromium_binary() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        raise BrowserError(
            "chromium is not installed: the OHIF test drives Debian's Chromium "
            "(apt-get install --no-install-recommends chromium fonts-dejavu-core)"
        )
    return binary


@dataclass
class Request:
    """One network request of the page and what became of it."""

    request_id: str
    url: str
    method: str
    resource_type: str
    accept: str | None
    status: int | None = None
    mime_type: str | None = None
    finished: bool = False
    failure: str | None = None

    @property
    def done(self) -> bool:
        return self.finished or self.failure is not None

    def describe(self) -> str:
        outcome = self.failure or (f"{self.status}" if self.status is not None else "pending")
        return (f"{self.method} {self.url} [{self.resource_type}] Accept={self.accept!r}"
                f" -> {outcome}")


@dataclass
class Page:
    """A page target: send commands, read the console and the network log."""

    ws: aiohttp.ClientWebSocketResponse
    requests: dict[str, Request] = field(default_factory=dict)
    console: list[str] = field(default_factory=list)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _pending: dict[int, asyncio.Future] = field(default_factory=dict)
    _tasks: set[asyncio.Task] = field(default_factory=set)

    def start(self) -> None:
        self._spawn(self.read_events())

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def attach_workers(self, session: str | None = None) -> None:
        """Auto-attach to the page's workers, each paused until its Network domain is on."""
        await self.send("Target.setAutoAttach", session, autoAttach=True,
                        waitForDebuggerOnStart=True, flatten=True)

    async def _watch(self, session: str) -> None:
        with contextlib.suppress(BrowserError, asyncio.TimeoutError):
            await self.send("Network.enable", session)
            await self.send("Runtime.enable", session)
            await self.attach_workers(session)
        with contextlib.suppress(BrowserError, asyncio.TimeoutError):
            await self.send("Runtime.runIfWaitingForDebugger", session)

    async def send(self, method: str, session: str | None = None, **params: Any) -> dict:
        """One command, to the page or (flat protocol) to an attached worker's session."""
        message_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[message_id] = future
        message = {"id": message_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        await self.ws.send_str(json.dumps(message))
        try:
            reply = await asyncio.wait_for(future, COMMAND_DEADLINE)
        finally:
            self._pending.pop(message_id, None)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression,
                                 returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"evaluate: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def navigate(self, url: str) -> None:
        result = await self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"navigate to {url}: {result['errorText']}")

    def requests_to(self, origin: str) -> list[Request]:
        return [r for r in self.requests.values() if r.url.startswith(origin + "/")]

    async def read_events(self) -> None:
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.get(data["id"])
                if future is not None and not future.done():
                    future.set_result(data)
            else:
                self._event(data.get("method", ""), data.get("params", {}),
                            data.get("sessionId"))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(BrowserError("the DevTools connection closed"))

    def _event(self, method: str, params: dict, session: str | None) -> None:
        key = f"{session or 'page'}/{params.get('requestId')}"
        if method == "Target.attachedToTarget":
            # A worker (or frame) of the page: record its requests too, then let it run.
            self._spawn(self._watch(params["sessionId"]))
        elif method == "Network.requestWillBeSent":
            request = params["request"]
            headers = {k.lower(): v for k, v in request.get("headers", {}).items()}
            hop = self.requests.pop(key, None)
            if hop is not None and "redirectResponse" in params:
                # A redirect reuses the request id: keep the hop, with its 3xx, on its own.
                hop.status, hop.finished = params["redirectResponse"]["status"], True
                self.requests[f"{key}#{len(self.requests)}"] = hop
            self.requests[key] = Request(
                key, request["url"], request["method"], params.get("type", "?"),
                headers.get("accept"),
            )
        elif method == "Network.responseReceived":
            entry = self.requests.get(key)
            if entry is not None:
                entry.status = params["response"]["status"]
                entry.mime_type = params["response"].get("mimeType")
        elif method == "Network.loadingFinished":
            entry = self.requests.get(key)
            if entry is not None:
                entry.finished = True
        elif method == "Network.loadingFailed":
            entry = self.requests.get(key)
            if entry is not None:
                reasons = [params.get("errorText", "failed")]
                if params.get("canceled"):
                    reasons.append("canceled")
                for name in ("blockedReason", "corsErrorStatus"):
                    if params.get(name):
                        reasons.append(f"{name}={params[name]}")
                entry.failure = " ".join(str(r) for r in reasons)
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.console.append(" ".join(
                str(arg.get("value", arg.get("description", "")))[:300]
                for arg in params.get("args", [])
            ))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text", "")
            self.console.append("uncaught: " + str(text)[:500])
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            entry = params["entry"]
            self.console.append(f"log: {entry.get('text', '')[:300]} {entry.get('url', '')}")


async def poll(
    probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], deadline: float,
    what: str | Callable[[], str], interval: float = 0.25,
) -> T:
    """Call `probe` until `done(result)`, at most until `deadline` (time.monotonic()); then
    TimeoutError saying `what` (a text, or a function that tells the state at that time)."""
    while True:
        result = await probe()
        if done(result):
            return result
        if time.monotonic() >= deadline:
            explained = what() if callable(what) else what
            raise TimeoutError(f"{explained}; last: {str(result)[:2000]}")
        await asyncio.sleep(interval)  # polling interval, not the synchronisation itself


async def _devtools_port(profile: Path, process: subprocess.Popen, log: Path) -> int:
    """Chromium started with --remote-debugging-port=0 writes the port it chose into
    DevToolsActivePort in its profile."""
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + START_DEADLINE
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BrowserError(f"chromium exited ({process.returncode}):\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(port_file.read_text().splitlines()[0])
        await asyncio.sleep(0.1)  # polling interval
    raise BrowserError(f"chromium wrote no DevToolsActivePort within {START_DEADLINE}s:\n"
                       f"{log.read_text(errors='replace')[-3000:]}")


@contextlib.asynccontextmanager
async def chromium_page(work_dir: Path) -> AsyncIterator[Page]:
    """A headless Chromium with a fresh profile under `work_dir`, and its one page target with
    the Page, Runtime, Log and Network domains enabled and the HTTP cache disabled."""
    binary = chromium_binary()
    profile = work_dir / "chromium-profile"
    profile.mkdir(parents=True)
    log = work_dir / "chromium.log"
    with log.open("wb") as log_handle:
        process = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
             "--remote-debugging-port=0", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=log_handle, stderr=subprocess.STDOUT,
        )
    try:
        port = await _devtools_port(profile, process, log)
        async with aiohttp.ClientSession() as session:
            async def targets() -> list[dict]:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                        return [t for t in await response.json() if t.get("type") == "page"]
                except aiohttp.ClientError:
                    return []

            pages = await poll(targets, bool, time.monotonic() + START_DEADLINE,
                               "chromium shows no page target")
            async with session.ws_connect(pages[0]["webSocketDebuggerUrl"],
                                          max_msg_size=0) as ws:
                page = Page(ws)
                page.start()
                try:
                    for domain in ("Page", "Runtime", "Log", "Network"):
                        await page.send(f"{domain}.enable")
                    await page.send("Network.setCacheDisabled", cacheDisabled=True)
                    await page.attach_workers()
                    yield page
                finally:
                    with contextlib.suppress(BrowserError, asyncio.TimeoutError):
                        await page.send("Browser.close")  # exits cleanly, then waited for
                    await page.stop()
    finally:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)
