"""The OHIF viewer, unmodified (npm @ohif/app, prebuilt), in headless Chromium against the
archive's DICOMweb root, cross-origin (so CORS is exercised for real): the study list shows the
ingested studies, a CT study renders, a segmentation published from a reader's outline is
drawn over it, and every request the viewer sent the archive got a 2xx.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pydicom
import pytest
from PIL import Image

from ricord_archive.labels.model import (
    Annotation,
    AnnotationMode,
    Code,
    Label,
    LabelType,
    Scope,
)
from tests.conftest import Archive
from tests.ct_phantom import DISC, MARKER, SIZE, ct_series
from tests.labels.test_label_dicom import publish
from tests.ohif import app_config, ohif_dist, serve_viewer
from tests.ohif_browser import Page, Request, chromium_binary, chromium_page, poll

pytestmark = pytest.mark.slow  # the OHIF viewer in headless Chromium

T = TypeVar("T")

LIST_DEADLINE = 60.0
RENDER_DEADLINE = 60.0
IDLE_DEADLINE = 30.0

ORIGINAL_IDENTIFIERS = ("OHIF-PAT-", "ALICE", "BOB", "ACC0000")


@dataclass
class Ingested:
    pseudonym: str
    study_uid: str


def ingest(archive: Archive) -> list[Ingested]:
    """Two patients, one CT study each, over STOW-RS; their pseudonyms and new study UIDs."""
    client = archive.client()
    sent = [
        ct_series("OHIF-PAT-1", "OHIF^ALICE", "20210304", slices=8, seed=1),
        ct_series("OHIF-PAT-2", "OHIF^BOB", "20220517", slices=4, size=128, seed=2),
    ]
    for datasets in sent:
        client.store_instances(datasets)
    studies = [pydicom.Dataset.from_json(s) for s in client.search_for_studies(
        fields=["PatientID", "NumberOfStudyRelatedInstances"])]
    assert len(studies) == len(sent), studies
    by_size = {int(s.NumberOfStudyRelatedInstances): s for s in studies}
    found = []
    for datasets in sent:
        study = by_size[len(datasets)]
        assert study.PatientID != datasets[0].PatientID
        found.append(Ingested(str(study.PatientID), study.StudyInstanceUID))
    return found


PAGE_TEXT = "document.body ? document.body.innerText : ''"
HIDE_TOUR = "localStorage.setItem('shownTours', '[\"basicViewerTour\"]')"

# The largest visible canvas (the viewport) and how many of its pixels are not black.
VIEWPORT_PROBE = r"""(() => {
  let best = null;
  for (const c of document.querySelectorAll('canvas')) {
    const r = c.getBoundingClientRect();
    if (r.width < 200 || r.height < 200) continue;
    if (best && r.width * r.height <= best.rect.width * best.rect.height) continue;
    let lit = -1;
    try {
      const t = document.createElement('canvas'); t.width = 64; t.height = 64;
      const g = t.getContext('2d'); g.drawImage(c, 0, 0, 64, 64);
      const d = g.getImageData(0, 0, 64, 64).data; lit = 0;
      for (let i = 0; i < d.length; i += 4) if (d[i] + d[i + 1] + d[i + 2] > 60) lit++;
    } catch (e) { lit = -2; }
    best = {rect: {x: r.x, y: r.y, width: r.width, height: r.height}, lit: lit};
  }
  if (best) best.dpr = window.devicePixelRatio || 1;
  return best;
})()"""


def archive_requests(page: Page, archive: Archive) -> list[Request]:
    return page.requests_to(archive.root)


async def network_idle(page: Page, origin: str, deadline: float) -> None:
    """Every request to `origin` finished (or failed), and stayed so for a moment."""
    quiet_since = None

    async def settled() -> bool:
        nonlocal quiet_since
        busy = any(not r.done for r in page.requests_to(origin))
        if busy:
            quiet_since = None
            return False
        quiet_since = quiet_since or time.monotonic()
        return time.monotonic() - quiet_since >= 1.0

    await poll(settled, bool, deadline, lambda: f"requests to {origin} still pending: " +
               "; ".join(r.describe() for r in page.requests_to(origin) if not r.done))


def viewport_of(png: bytes, probe: dict, mode: str = "L") -> np.ndarray:
    """The viewport's pixels in the screenshot (grey levels, or RGB with `mode` "RGB")."""
    shot = np.asarray(Image.open(io.BytesIO(png)).convert(mode), dtype=np.float64)
    rect, scale = probe["rect"], probe["dpr"]
    x0, y0 = round(rect["x"] * scale), round(rect["y"] * scale)
    w, h = round(rect["width"] * scale), round(rect["height"] * scale)
    return shot[y0:y0 + h, x0:x0 + w]


def at(viewport: np.ndarray, column: float, row: float) -> np.ndarray:
    """The median of a small patch around an image pixel (the image fits the viewport's
    shorter side, centred): a grey level, or (R, G, B)."""
    h, w = viewport.shape[:2]
    side = min(w, h)
    cx = (w - side) / 2 + column / SIZE * side
    cy = (h - side) / 2 + row / SIZE * side
    half = max(2, round(side / SIZE * 4))
    patch = viewport[round(cy) - half:round(cy) + half, round(cx) - half:round(cx) + half]
    return np.median(patch.reshape(-1, *viewport.shape[2:]), axis=0)


def check_rendered(png: bytes, probe: dict, out: Path) -> None:
    """The screenshot's viewport shows the phantom: air dark, the disc grey, the bone marker
    white at the upper left (and nothing at its mirror images)."""
    viewport = viewport_of(png, probe)
    assert viewport.size and viewport.std() > 20, (
        f"the viewport {probe['rect']} is blank (std {viewport.std():.1f}); screenshot {out}")

    def level(column: float, row: float) -> float:
        return float(at(viewport, column, row))

    levels = {
        "disc centre": level(DISC[0], DISC[1]),
        "disc, lower right": level(DISC[0] + 30, DISC[1] + 30),
        "bone marker (upper left)": level(MARKER[0], MARKER[1]),
        "air, lower right": level(220, 220),
        "air, upper right (marker mirrored)": level(SIZE - MARKER[0], MARKER[1]),
        "air, lower left (marker flipped)": level(MARKER[0], SIZE - MARKER[1]),
    }
    expected = {
        "disc centre": (110, 220),  # 100 HU in a 40/400 window: 65 % grey
        "disc, lower right": (110, 220),
        "bone marker (upper left)": (235, 256),
        "air, lower right": (0, 25),
        "air, upper right (marker mirrored)": (0, 25),
        "air, lower left (marker flipped)": (0, 25),
    }
    wrong = {name: value for name, value in levels.items()
             if not expected[name][0] <= value < expected[name][1]}
    assert not wrong, f"unexpected grey levels {wrong} (all: {levels}); screenshot {out}"


@dataclass
class Session:
    """The viewer in the browser against the archive, with the waits and checks every test
    makes."""

    archive: Archive
    page: Page
    viewer: str  # the viewer server's origin
    work: Path

    def report(self) -> str:
        """The archive's requests, the viewer server's failures, the console errors."""
        page = self.page
        to_archive = [r.describe() for r in archive_requests(page, self.archive)]
        static = [r.describe() for r in page.requests_to(self.viewer)
                  if r.failure or (r.status or 0) >= 400]
        return ("\nrequests to the archive:\n  " + "\n  ".join(to_archive[-80:]) +
                "\nfailed requests to the viewer's server:\n  " + "\n  ".join(static) +
                "\nconsole errors:\n  " + "\n  ".join(page.console[-40:]))

    async def reported(self, waited: Awaitable[T]) -> T:
        """A bounded wait; when it times out, the test fails with the report."""
        try:
            return await waited
        except TimeoutError as exc:
            raise AssertionError(f"{exc}{self.report()}") from None

    async def idle(self) -> None:
        await self.reported(network_idle(self.page, self.archive.root,
                                         time.monotonic() + IDLE_DEADLINE))

    async def screenshot(self, name: str) -> bytes:
        shot = await self.page.send("Page.captureScreenshot", format="png")
        png = base64.b64decode(shot["data"])
        (self.work / name).write_bytes(png)
        return png

    async def rendered(self, query: str, name: str) -> tuple[bytes, dict]:
        """Open the viewer at `query`; first a lit canvas, then, once every request is
        answered and two more frames are drawn, the screenshot and the viewport's probe."""
        await self.page.navigate(f"{self.viewer}/viewer?{query}")
        await self.reported(poll(
            lambda: self.page.evaluate(VIEWPORT_PROBE),
            lambda p: bool(p) and p["lit"] > 200,
            time.monotonic() + RENDER_DEADLINE, "no viewport canvas shows an image",
        ))
        await self.idle()
        await self.page.evaluate("new Promise(r => requestAnimationFrame(() => "
                                 "requestAnimationFrame(r)))")
        probe = await self.page.evaluate(VIEWPORT_PROBE)
        text = await self.page.evaluate(PAGE_TEXT)
        for original in ORIGINAL_IDENTIFIERS:
            assert original not in text, f"{original!r} in the viewer"
        png = await self.screenshot(name)
        (self.work / "requests.txt").write_text(self.report())
        return png, probe

    def check_requests(self) -> list[Request]:
        """Every request the viewer sent the archive succeeded; those requests."""
        sent = archive_requests(self.page, self.archive)
        failed = [r for r in sent if r.failure or r.status is None or not 200 <= r.status < 300]
        assert not failed, "requests to the archive that failed:\n  " + "\n  ".join(
            r.describe() for r in failed) + self.report()
        return sent


@contextlib.asynccontextmanager
async def session(archive: Archive, dist: Path, work: Path) -> AsyncIterator[Session]:
    config = app_config(archive.dicomweb_url, f"{archive.root}/wado")
    async with serve_viewer(dist, config) as viewer, chromium_page(work) as page:
        yield Session(archive, page, viewer, work)


async def drive(archive: Archive, dist: Path, ingested: list[Ingested], work: Path) -> None:
    async with session(archive, dist, work) as viewer:
        page = viewer.page
        # (a) The study list shows both pseudonymous patients, and no original identifier.
        await page.navigate(f"{viewer.viewer}/")
        text = await viewer.reported(poll(
            lambda: page.evaluate(PAGE_TEXT),
            lambda t: all(s.pseudonym in (t or "") for s in ingested),
            time.monotonic() + LIST_DEADLINE, "the study list does not show the studies",
        ))
        await viewer.idle()
        await viewer.screenshot("ohif-study-list.png")
        assert "Error" not in text, text[:2000] + viewer.report()
        for original in ORIGINAL_IDENTIFIERS:
            assert original not in text, f"{original!r} in the study list"
        assert any("/dicom-web/studies?" in r.url for r in archive_requests(page, archive))

        # The list's Patient filter (its first input) is a wildcard search with fuzzy matching.
        first, second = ingested[0].pseudonym, ingested[1].pseudonym
        number = second.split("-")[1]
        await page.evaluate("document.querySelector('input').focus()")
        await page.send("Input.insertText", text=number)
        await viewer.reported(poll(
            lambda: page.evaluate(PAGE_TEXT),
            lambda t: second in (t or "") and first not in (t or ""),
            time.monotonic() + LIST_DEADLINE, f"the Patient filter {number!r} shows not only "
            f"{second}",
        ))
        await viewer.idle()
        assert any(f"PatientName=*{number}*&" in r.url and "fuzzymatching=true" in r.url
                   for r in archive_requests(page, archive)), viewer.report()
        # The viewer's first-visit tour would cover part of the viewport: mark it as seen, as
        # the viewer itself does once a user dismissed it.
        await page.evaluate(HIDE_TOUR)

        # (b) The viewer renders the CT study.
        ct = ingested[0]
        png, probe = await viewer.rendered(f"StudyInstanceUIDs={ct.study_uid}",
                                           "ohif-viewer.png")
        check_rendered(png, probe, work / "ohif-viewer.png")

        # (c) Every request the viewer sent the archive succeeded.
        sent = viewer.check_requests()
        assert any("/frames/" in r.url for r in sent), "the viewer fetched no frames" + \
            viewer.report()
        assert any("/metadata" in r.url for r in sent), viewer.report()


@pytest.mark.timeout(600)  # the first run downloads the viewer (50 MB)
def test_ohif_viewer_shows_the_archive(make_archive, tmp_path):
    chromium_binary()  # fail early, and clearly, when Chromium is missing
    dist = ohif_dist()
    archive = make_archive()
    ingested = ingest(archive)
    asyncio.run(drive(archive, dist, ingested, tmp_path))


# A reader's outline in air at the lower right of slice 4, in image pixels (x, y).
OUTLINE = [[185, 185], [235, 185], [235, 235], [185, 235]]
INSIDE = (210, 210)
ELSEWHERE = {"upper right": (210, 46), "lower left": (46, 210), "disc centre": DISC[:2]}


def redness(rgb: np.ndarray) -> float:
    return float(rgb[0] - max(rgb[1], rgb[2]))


async def drive_segmentation(archive: Archive, dist: Path, study_uid: str, seg_series: str,
                             work: Path) -> None:
    async with session(archive, dist, work) as viewer:
        await viewer.page.navigate(f"{viewer.viewer}/")
        await viewer.page.evaluate(HIDE_TOUR)
        png, probe = await viewer.rendered(f"StudyInstanceUIDs={study_uid}", "ohif-ct.png")
        plain = viewport_of(png, probe, "RGB")
        assert abs(redness(at(plain, *INSIDE))) < 15, "the CT alone is coloured at the outline"

        # The SEG series opened: the viewer shows it over the CT slice it was drawn on.
        await viewer.rendered(f"StudyInstanceUIDs={study_uid}&initialSeriesInstanceUID="
                              f"{seg_series}", "ohif-seg.png")

        async def shown() -> tuple[np.ndarray, dict]:
            probe = await viewer.page.evaluate(VIEWPORT_PROBE)
            return viewport_of(await viewer.screenshot("ohif-seg.png"), probe, "RGB"), probe

        overlay, probe = await viewer.reported(poll(
            shown, lambda shot: redness(at(shot[0], *INSIDE)) > 40,
            time.monotonic() + RENDER_DEADLINE, "no segment colour inside the outline",
        ))
        coloured = {name: redness(at(overlay, *point)) for name, point in ELSEWHERE.items()}
        assert all(abs(value) < 15 for value in coloured.values()), (
            f"segment colour outside the outline: {coloured}; screenshot {work}/ohif-seg.png")
        sent = viewer.check_requests()
        assert any(seg_series in r.url for r in sent), viewer.report()


@pytest.mark.timeout(600)
def test_ohif_shows_a_segmentation_over_the_ct(make_archive, tmp_path):
    chromium_binary()
    dist = ohif_dist()
    archive = make_archive()
    client = archive.client()
    client.store_instances(ct_series("OHIF-PAT-3", "OHIF^CAROL", "20200202", slices=8, seed=3))
    [study] = [pydicom.Dataset.from_json(s) for s in client.search_for_studies()]
    slices = {int(i.InstanceNumber): i for i in (
        pydicom.Dataset.from_json(j) for j in client.search_for_instances(
            study.StudyInstanceUID, fields=["InstanceNumber", "SeriesInstanceUID"]))}
    opacity = Label("L_opacity", "Infectious opacity", "G", Scope.INSTANCE, LabelType.LOCAL,
                    AnnotationMode.FREEFORM, "#ff0000", None,
                    Code("99RICORD", "R0001", "Infectious opacity"))
    outline = Annotation("A1", opacity.id, study.StudyInstanceUID,
                         slices[4].SeriesInstanceUID, slices[4].SOPInstanceUID, None,
                         "R-0000000A", {"vertices": OUTLINE}, None)
    [seg] = publish(archive, [outline], {opacity.id: opacity}).published
    asyncio.run(drive_segmentation(archive, dist, study.StudyInstanceUID, seg.series_uid,
                                   tmp_path))
