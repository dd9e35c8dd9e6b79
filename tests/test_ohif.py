"""The OHIF viewer, unmodified (npm @ohif/app, prebuilt), in headless Chromium against the
archive's DICOMweb root, cross-origin (so CORS is exercised for real): the study list shows the
ingested studies, a CT study renders, and every request the viewer sent the archive got a 2xx.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from tests.conftest import Archive
from tests.ohif import app_config, ohif_dist, serve_viewer
from tests.ohif_browser import Page, Request, chromium_binary, chromium_page, poll

pytestmark = pytest.mark.slow  # the OHIF viewer in headless Chromium

T = TypeVar("T")

LIST_DEADLINE = 60.0
RENDER_DEADLINE = 60.0
IDLE_DEADLINE = 30.0

# The phantom, in image pixels of a SIZE x SIZE slice: a soft-tissue disc in the centre and a
# small bone disc in the upper left quadrant (to see that the image is neither flipped nor
# mirrored), in air.
SIZE = 256
DISC = (128, 128, 60)  # column, row, radius
MARKER = (64, 64, 18)
AIR_HU, DISC_HU, MARKER_HU = -1000, 100, 1000
WINDOW = (40, 400)  # soft tissue: -160 HU black, 240 HU white


def ct_series(patient_id: str, patient_name: str, study_date: str, slices: int,
              size: int = SIZE, seed: int = 0) -> list[Dataset]:
    """A CT series with consistent geometry: axial slices 2.5 mm apart, 0.7 mm pixels."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:size, 0:size]
    scale = size / SIZE
    hu = np.full((size, size), AIR_HU, dtype=np.int32)
    for (x, y, r), value in ((DISC, DISC_HU), (MARKER, MARKER_HU)):
        inside = (columns - x * scale) ** 2 + (rows - y * scale) ** 2 <= (r * scale) ** 2
        hu[inside] = value
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    spacing, thickness = 0.7, 2.5
    origin = -spacing * size / 2
    datasets = []
    for number in range(1, slices + 1):
        z = -100.0 + (number - 1) * thickness
        noisy = hu + rng.integers(-8, 9, size=hu.shape)
        stored = (noisy + 1024).clip(0, 4095).astype(np.uint16)
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "093000"
        ds.AccessionNumber = f"ACC{seed:05d}"
        ds.StudyID = f"S{seed}"
        ds.Modality = "CT"
        ds.Manufacturer = "ACME MEDICAL"
        ds.StudyDescription = "CT CHEST"
        ds.SeriesDescription = "AXIAL 2.5"
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19600101"
        ds.PatientSex = "F"
        ds.BodyPartExamined = "CHEST"
        ds.KVP = 120
        ds.SliceThickness = thickness
        ds.SeriesNumber = 2
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [origin, origin, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = z
        ds.PixelSpacing = [spacing, spacing]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = WINDOW
        ds.PixelData = stored.tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        part10 = io.BytesIO()
        ds.save_as(part10, enforce_file_format=True)
        datasets.append(pydicom.dcmread(io.BytesIO(part10.getvalue())))
    return datasets


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


def check_rendered(png: bytes, probe: dict, out: Path) -> None:
    """The screenshot's viewport shows the phantom: air dark, the disc grey, the bone marker
    white at the upper left (and nothing at its mirror images)."""
    shot = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)
    rect, scale = probe["rect"], probe["dpr"]
    x0, y0 = round(rect["x"] * scale), round(rect["y"] * scale)
    w, h = round(rect["width"] * scale), round(rect["height"] * scale)
    viewport = shot[y0:y0 + h, x0:x0 + w]
    assert viewport.size and viewport.std() > 20, (
        f"the viewport {rect} is blank (std {viewport.std():.1f}); screenshot {out}")
    # The image fits the viewport's shorter side, centred.
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2

    def level(column: float, row: float) -> float:
        cx, cy = left + column / SIZE * side, top + row / SIZE * side
        half = max(2, round(side / SIZE * 4))
        patch = viewport[round(cy) - half:round(cy) + half, round(cx) - half:round(cx) + half]
        return float(np.median(patch))

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


async def drive(archive: Archive, dist: Path, ingested: list[Ingested], work: Path) -> None:
    config = app_config(archive.dicomweb_url, f"{archive.root}/wado")
    async with serve_viewer(dist, config) as viewer, chromium_page(work) as page:
        def report() -> str:
            """The archive's requests, the viewer server's failures, the console errors."""
            to_archive = [r.describe() for r in archive_requests(page, archive)]
            static = [r.describe() for r in page.requests_to(viewer)
                      if r.failure or (r.status or 0) >= 400]
            return ("\nrequests to the archive:\n  " + "\n  ".join(to_archive[-80:]) +
                    "\nfailed requests to the viewer's server:\n  " + "\n  ".join(static) +
                    "\nconsole errors:\n  " + "\n  ".join(page.console[-40:]))

        async def reported(waited: Awaitable[T]) -> T:
            """A bounded wait; when it times out, the test fails with the report."""
            try:
                return await waited
            except TimeoutError as exc:
                raise AssertionError(f"{exc}{report()}") from None

        async def idle() -> None:
            await reported(network_idle(page, archive.root, time.monotonic() + IDLE_DEADLINE))

        async def screenshot(name: str) -> bytes:
            shot = await page.send("Page.captureScreenshot", format="png")
            png = base64.b64decode(shot["data"])
            (work / name).write_bytes(png)
            return png

        # (a) The study list shows both pseudonymous patients, and no original identifier.
        await page.navigate(f"{viewer}/")
        text = await reported(poll(
            lambda: page.evaluate(PAGE_TEXT),
            lambda t: all(s.pseudonym in (t or "") for s in ingested),
            time.monotonic() + LIST_DEADLINE, "the study list does not show the studies",
        ))
        await idle()
        await screenshot("ohif-study-list.png")
        assert "Error" not in text, text[:2000] + report()
        for original in ORIGINAL_IDENTIFIERS:
            assert original not in text, f"{original!r} in the study list"
        assert any("/dicom-web/studies?" in r.url for r in archive_requests(page, archive))

        # The list's Patient filter (its first input) is a wildcard search with fuzzy matching.
        first, second = ingested[0].pseudonym, ingested[1].pseudonym
        number = second.split("-")[1]
        await page.evaluate("document.querySelector('input').focus()")
        await page.send("Input.insertText", text=number)
        await reported(poll(
            lambda: page.evaluate(PAGE_TEXT),
            lambda t: second in (t or "") and first not in (t or ""),
            time.monotonic() + LIST_DEADLINE, f"the Patient filter {number!r} shows not only "
            f"{second}",
        ))
        await idle()
        assert any(f"PatientName=*{number}*&" in r.url and "fuzzymatching=true" in r.url
                   for r in archive_requests(page, archive)), report()
        # The viewer's first-visit tour would cover part of the viewport: mark it as seen, as
        # the viewer itself does once a user dismissed it.
        await page.evaluate("localStorage.setItem('shownTours', '[\"basicViewerTour\"]')")

        # (b) The viewer renders the CT study: first a lit canvas, then, once every request
        # is answered and two more frames are drawn, the screenshot's pixels.
        ct = ingested[0]
        await page.navigate(f"{viewer}/viewer?StudyInstanceUIDs={ct.study_uid}")
        await reported(poll(
            lambda: page.evaluate(VIEWPORT_PROBE),
            lambda p: bool(p) and p["lit"] > 200,
            time.monotonic() + RENDER_DEADLINE, "no viewport canvas shows an image",
        ))
        await idle()
        await page.evaluate("new Promise(r => requestAnimationFrame(() => "
                            "requestAnimationFrame(r)))")
        probe = await page.evaluate(VIEWPORT_PROBE)
        text = await page.evaluate(PAGE_TEXT)
        for original in ORIGINAL_IDENTIFIERS:
            assert original not in text, f"{original!r} in the viewer"
        png = await screenshot("ohif-viewer.png")
        (work / "requests.txt").write_text(report())
        check_rendered(png, probe, work / "ohif-viewer.png")

        # (c) Every request the viewer sent the archive succeeded.
        sent = archive_requests(page, archive)
        assert any("/frames/" in r.url for r in sent), "the viewer fetched no frames" + report()
        assert any("/metadata" in r.url for r in sent), report()
        failed = [r for r in sent if r.failure or r.status is None or not 200 <= r.status < 300]
        assert not failed, "requests to the archive that failed:\n  " + "\n  ".join(
            r.describe() for r in failed) + report()


@pytest.mark.timeout(600)  # the first run downloads the viewer (50 MB)
def test_ohif_viewer_shows_the_archive(make_archive, tmp_path):
    chromium_binary()  # fail early, and clearly, when Chromium is missing
    dist = ohif_dist()
    archive = make_archive()
    ingested = ingest(archive)
    asyncio.run(drive(archive, dist, ingested, tmp_path))
