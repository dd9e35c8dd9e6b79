"""The published OHIF viewer for browser tests: fetched once with `npm pack`, checked against a
pinned sha256, cached extracted, and served from loopback with our own `app-config.js`.

The cache lives in `$RICORD_TEST_CACHE` (default `~/.cache/ricord-archive-tests`), under
`ohif/<version>/`; a run that finds a complete extraction there does not touch npm at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"
OHIF_SHA256 = "b189d3963bfc58e9394a9db8c7be75d07beb029ec211dbb126d47b62969dd3f1"
NPM_DEADLINE = 420.0


def cache_root() -> Path:
    configured = os.environ.get("RICORD_TEST_CACHE")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "ricord-archive-tests"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def ohif_dist(root: Path | None = None) -> Path:
    """The `dist/` directory of @ohif/app at the pinned version, fetching it if needed.

    Raises RuntimeError with a clear message when npm is missing, the registry cannot be
    reached, or the tarball is not the one pinned.
    """
    target = (root or cache_root()) / "ohif" / OHIF_VERSION
    marker = target / "complete"
    dist = target / "package" / "dist"
    if marker.is_file() and marker.read_text().strip() == OHIF_SHA256 and (
        dist / "index.html"
    ).is_file():
        return dist
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            "npm is not installed: it is needed to fetch the OHIF viewer "
            f"(npm pack {OHIF_PACKAGE}@{OHIF_VERSION}); on Debian: apt-get install npm"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{OHIF_VERSION}.", dir=target.parent) as scratch:
        work = Path(scratch)
        env = {**os.environ, "npm_config_update_notifier": "false", "npm_config_fund": "false",
               "npm_config_audit": "false", "npm_config_loglevel": "error"}
        packed = subprocess.run(
            [npm, "pack", f"{OHIF_PACKAGE}@{OHIF_VERSION}", "--json",
             "--pack-destination", str(work)],
            cwd=work, env=env, capture_output=True, text=True, timeout=NPM_DEADLINE,
        )
        if packed.returncode != 0:
            raise RuntimeError(
                f"npm pack {OHIF_PACKAGE}@{OHIF_VERSION} failed ({packed.returncode}):\n"
                f"{packed.stderr[-2000:]}"
            )
        try:
            filename = json.loads(packed.stdout)[0]["filename"]
        except (ValueError, LookupError, TypeError) as exc:
            raise RuntimeError(f"unexpected npm pack output: {packed.stdout[-1000:]!r}") from exc
        tarball = work / filename
        digest = _sha256(tarball)
        if digest != OHIF_SHA256:
            raise RuntimeError(
                f"{filename} has sha256 {digest}, expected {OHIF_SHA256}: not the pinned "
                f"{OHIF_PACKAGE}@{OHIF_VERSION}"
            )
        unpacked = work / "unpacked"
        with tarfile.open(tarball) as archive:
            archive.extractall(unpacked, filter="data")
        if not (unpacked / "package" / "dist" / "index.html").is_file():
            raise RuntimeError(f"{filename} has no package/dist/index.html")
        (unpacked / "complete").write_text(OHIF_SHA256 + "\n")
        if target.exists():
            shutil.rmtree(target)
        unpacked.rename(target)  # atomic: a half extraction is never seen as complete
    return dist


def app_config(dicomweb_root: str, wado_uri_root: str) -> str:
    """`window.config` with one DICOMweb data source at `dicomweb_root`, declaring what the
    archive supports: includefield, fuzzy matching, wildcards, WADO-RS frames, /thumbnail."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "ricord",
        "configuration": {
            "friendlyName": "ricord-archive",
            "name": "ricord",
            "wadoUriRoot": wado_uri_root,
            "qidoRoot": dicomweb_root,
            "wadoRoot": dicomweb_root,
            "qidoSupportsIncludeField": True,
            "supportsFuzzyMatching": True,
            "supportsWildcard": True,
            "imageRendering": "wadors",
            "thumbnailRendering": "thumbnail",
            "enableStudyLazyLoad": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 10},
        "showErrorDetails": "always",
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "ricord",
        "dataSources": [source],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


def viewer_app(dist: Path, config_js: str) -> web.Application:
    """Static `dist/` with our `app-config.js`; any other unknown path is the single-page
    app's `index.html` (routes such as /viewer), as a production deployment serves it."""
    dist = dist.resolve()
    index = dist / "index.html"

    async def config(request: web.Request) -> web.Response:
        return web.Response(text=config_js, content_type="application/javascript")

    async def static(request: web.Request) -> web.StreamResponse:
        relative = request.match_info["path"]
        candidate = (dist / relative).resolve()
        if relative and candidate.is_relative_to(dist) and candidate.is_file():
            return web.FileResponse(candidate)
        return web.FileResponse(index, headers={"Cache-Control": "no-store"})

    app = web.Application()
    app.router.add_get("/app-config.js", config)
    app.router.add_get("/{path:.*}", static)
    return app


@contextlib.asynccontextmanager
async def serve_viewer(dist: Path, config_js: str) -> AsyncIterator[str]:
    """Serve the viewer on a free 127.0.0.1 port; yields its origin."""
    runner = web.AppRunner(viewer_app(dist, config_js), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()
