"""`ricord-archive cohort create|list|download`: a client of a running archive's /api/cohorts.

A download writes `OUT.part` (and `OUT.part.json`: the archive's ETag and size), resumes it
with `Range` after an interruption (the archive restarted, the network failed), and when it is
complete checks every file of the ZIP against the size and SHA-256 the archive lists before it
becomes OUT.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO, TypeVar

from tqdm import tqdm

from ricord_archive.tools import ToolError

T = TypeVar("T")
_CHUNK = 256 * 1024
_TIMEOUT = 60
_TRANSIENT = (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException)


@dataclass(frozen=True)
class Api:
    """The archive's base URL (`http://host:port`) and an optional bearer token."""

    url: str
    token: str | None = None

    def request(self, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
        """The open response of a request; ToolError with the archive's message on an
        HTTP error (transient failures pass through as they are)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url.rstrip('/')}{path}", data=data,
                                         method=method, headers=headers or {})
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            return urllib.request.urlopen(request, timeout=_TIMEOUT)
        except urllib.error.HTTPError as exc:
            if exc.code >= 500:  # the archive is starting or failing: try again
                raise
            raise ToolError(f"{method} {path}: {exc.code} {_message(exc)}") from None

    def json(self, method: str, path: str, body: Any = None) -> Any:
        with self.request(method, path, body) as response:
            return json.loads(response.read())


def _message(error: urllib.error.HTTPError) -> str:
    text = error.read().decode("utf-8", "replace")
    try:
        return json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return text.strip()[:200]


def with_retries(action: Callable[[], T], retries: int, progress: Callable[[], int],
                 log: TextIO) -> T:
    """Run `action` again after a transient failure, at most `retries` times in a row without
    progress (`progress()` grows when some work was done), waiting a little longer each time."""
    failures, last = 0, progress()
    while True:
        try:
            return action()
        except _TRANSIENT as exc:
            if progress() > last:
                failures, last = 0, progress()
            failures += 1
            if failures > retries:
                raise ToolError(f"giving up after {retries} retries: {exc}") from None
            wait = min(0.5 * 2 ** (failures - 1), 5.0)
            print(f"interrupted ({type(exc).__name__}); retrying in {wait:g} s", file=log)
            time.sleep(wait)


def create(api: Api, name: str, filters: dict[str, str], description: str, license_text: str,
           citation: str) -> dict[str, Any]:
    return api.json("POST", "/api/cohorts", {
        "name": name, "description": description, "license": license_text,
        "citation": citation, "filters": filters,
    })


def print_cohorts(api: Api, out: TextIO) -> None:
    print("id\tname\tstudies\tseries\tinstances\tbytes\tcreated", file=out)
    for c in api.json("GET", "/api/cohorts"):
        counts = c["counts"]
        print(f"{c['id']}\t{c['name']}\t{counts['studies']}\t{counts['series']}\t"
              f"{counts['instances']}\t{c['bytes']}\t{c['created']}", file=out)


class _Download:
    """One resumable download of a cohort's ZIP into `part`."""

    def __init__(self, api: Api, cohort_id: int, part: Path, etag: str, size: int,
                 rate: int | None) -> None:
        self.api, self.cohort_id, self.part = api, cohort_id, part
        self.etag, self.size, self.rate = etag, size, rate
        self.bar = tqdm(total=size, unit="B", unit_scale=True, file=sys.stderr,
                        desc=f"cohort {cohort_id}")

    def have(self) -> int:
        return self.part.stat().st_size if self.part.exists() else 0

    def fetch(self) -> None:
        """Ask for the rest (all of it when the archive no longer has what the part began)."""
        start = self.have()
        if start >= self.size:
            return
        headers = {"Range": f"bytes={start}-", "If-Range": self.etag}
        with self.api.request("GET", f"/api/cohorts/{self.cohort_id}/archive.zip",
                              headers=headers) as response:
            if response.status == 200:  # not the same archive any more: start again
                if response.headers.get("ETag") != self.etag:
                    raise ToolError("the cohort's archive changed on the server; start over")
                start = 0
            self.bar.reset(total=self.size)
            self.bar.update(start)
            with self.part.open("r+b" if self.part.exists() else "wb") as out:
                out.truncate(start)
                out.seek(start)
                self._copy(response, out)

    def _copy(self, response: BinaryIO, out: BinaryIO) -> None:
        began, copied = time.monotonic(), 0
        while chunk := response.read(_CHUNK):
            out.write(chunk)
            out.flush()
            copied += len(chunk)
            self.bar.update(len(chunk))
            if self.rate:  # keep to the asked rate on average
                ahead = copied / self.rate - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)
        if out.tell() != self.size:
            raise http.client.IncompleteRead(b"", self.size - out.tell())


def check_zip(path: Path, files: list[dict[str, Any]]) -> list[str]:
    """The listed files missing from the ZIP or differing in size or SHA-256 (zipfile checks
    each entry's CRC-32 as well)."""
    bad = []
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        for listed in files:
            if listed["path"] not in names:
                bad.append(f"{listed['path']}: missing")
                continue
            digest, size = hashlib.sha256(), 0
            try:
                with archive.open(listed["path"]) as member:
                    while chunk := member.read(_CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
            except zipfile.BadZipFile:
                bad.append(f"{listed['path']}: CRC-32 mismatch")
                continue
            if size != listed["size"] or digest.hexdigest() != listed["sha256"]:
                bad.append(f"{listed['path']}: size or SHA-256 differs")
    return bad


def download(api: Api, cohort_id: int, out: Path, retries: int = 20,
             rate: int | None = None, log: TextIO = sys.stderr) -> int:
    """Download the cohort's ZIP to `out`, resuming a partial one; the number of files
    checked."""
    part, state = out.with_name(out.name + ".part"), out.with_name(out.name + ".part.json")
    listing = with_retries(lambda: api.json("GET", f"/api/cohorts/{cohort_id}/files"),
                           retries, lambda: 0, log)
    etag, size = listing["archive"]["etag"], listing["archive"]["size"]
    known = json.loads(state.read_text()) if state.exists() else None
    if known != {"etag": etag, "size": size}:
        part.unlink(missing_ok=True)  # another archive (or none) was begun: start again
        state.write_text(json.dumps({"etag": etag, "size": size}))
    job = _Download(api, cohort_id, part, etag, size, rate)
    try:
        with_retries(job.fetch, retries, job.have, log)
    finally:
        job.bar.close()
    bad = check_zip(part, listing["files"])
    if bad:
        part.unlink()
        state.unlink()
        raise ToolError(f"{len(bad)} files do not match what the archive lists (first: "
                        f"{bad[0]}); the download was removed, run it again")
    part.replace(out)
    state.unlink()
    print(f"{out}: {len(listing['files'])} files, {size} bytes, every file matches its size "
          "and SHA-256", file=log)
    return len(listing["files"])
