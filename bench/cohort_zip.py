"""Cohort ZIP streaming: freeze time, download throughput, and the server's memory while it
streams (one server process), for a cohort of N objects of S MB stored by STOW-RS.

    python bench/cohort_zip.py --objects 100 --megabytes 2

Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path

import requests
from ours import Ours
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def ct(patient: str, study: str, series: str, number: int, side: int) -> bytes:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.Modality, ds.StudyDate, ds.InstanceNumber = patient, "CT", "20210101", number
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = os.urandom(side * side * 2)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def stow(url: str, objects: list[bytes]) -> None:
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + o
                    + b"\r\n" for o in objects) + f"--{boundary}--\r\n".encode()
    response = requests.post(f"{url}/dicom-web/studies", data=body, timeout=600, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    response.raise_for_status()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--objects", type=int, default=100)
    parser.add_argument("--megabytes", type=float, default=2.0, help="size of each object")
    args = parser.parse_args()
    side = int((args.megabytes * 1024 * 1024 / 2) ** 0.5)
    with tempfile.TemporaryDirectory(prefix="cohort-bench-") as tmp:
        root = Path(tmp)
        (root / "config.toml").write_text("[server]\nprocesses = 1\n")
        archive = Ours(root, root / "config.toml")
        archive.start()
        try:
            study, series = generate_uid(), generate_uid()
            for start in range(0, args.objects, 10):
                stow(archive.url, [ct("BENCH", study, series, n + 1, side)
                                   for n in range(start, min(start + 10, args.objects))])
            began = time.perf_counter()
            created = requests.post(f"{archive.url}/api/cohorts", json={
                "name": "bench", "filters": {"Modality": "CT"}}, timeout=600)
            created.raise_for_status()
            freeze = time.perf_counter() - began
            cohort = created.json()
            idle = rss_kib(archive.pid)
            peak, done = idle, threading.Event()

            def sample() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, rss_kib(archive.pid))
                    time.sleep(0.01)

            sampler = threading.Thread(target=sample)
            sampler.start()
            began, received = time.perf_counter(), 0
            with requests.get(f"{archive.url}/api/cohorts/{cohort['id']}/archive.zip",
                              stream=True, timeout=600) as response:
                for chunk in response.iter_content(1024 * 1024):
                    received += len(chunk)
            elapsed = time.perf_counter() - began
            done.set()
            sampler.join()
        finally:
            archive.cleanup()
    print(f"cohort: {cohort['counts']['instances']} objects, {cohort['bytes'] / 1e6:.1f} MB")
    print(f"freeze (query, CRC-32 of every object, metadata.csv): {freeze:.2f} s")
    print(f"archive.zip: {received / 1e6:.1f} MB in {elapsed:.2f} s = "
          f"{received / 1e6 / elapsed:.0f} MB/s")
    print(f"server RSS: {idle / 1024:.0f} MiB before, {peak / 1024:.0f} MiB at most while "
          "streaming")


if __name__ == "__main__":
    main()
