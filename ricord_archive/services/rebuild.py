"""Rebuilding the index from the blob store: the disaster-recovery path when the database is
lost. Every stored object is already de-identified, so it is read, described exactly as ingest
describes it, and indexed under its existing blob key; sites and patients come back from the
allocation records kept beside the blobs (`records`), so returning patients keep their
pseudonyms and date offsets."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, replace
from io import BytesIO

import pydicom

from ricord_archive.blobstore import Blob, BlobStore
from ricord_archive.blobstore.records import PatientRecord, SiteRecord
from ricord_archive.config import Config, SiteConfig
from ricord_archive.dicom.io import pixel_data_location
from ricord_archive.index.facade import Index
from ricord_archive.index.store import Patient, Site
from ricord_archive.services.ingest import describe

log = logging.getLogger(__name__)


class RebuildError(RuntimeError):
    """The index cannot be rebuilt here (it is not empty)."""


@dataclass
class RebuildReport:
    instances: int = 0
    patients: int = 0
    unreadable: int = 0  # blobs that are not DICOM the archive wrote (left in place)
    patients_without_record: int = 0  # new pseudonym links for them are lost (see README)

    def lines(self) -> list[str]:
        return [f"indexed instances: {self.instances}", f"patients: {self.patients}",
                f"unreadable blobs (left in place): {self.unreadable}",
                f"patients without an allocation record: {self.patients_without_record}"]


async def record_sites(blobs: BlobStore, sites: Iterable[Site]) -> None:
    """Keep each site's SITEID beside the blobs (at every start: cheap, and self-healing)."""
    for site in sites:
        record = SiteRecord(site.name, site.siteid)
        await asyncio.to_thread(blobs.records.write, record.record_name, record.encode())


async def rebuild_index(index: Index, blobs: BlobStore, config: Config) -> RebuildReport:
    """Index every blob of the store into an empty index."""
    if not await index.is_empty():
        raise RebuildError("the index is not empty: rebuild-index only fills an empty index")
    sites = await _sites(index, blobs, config)
    patients = await _patients(index, blobs, sites)
    report = RebuildReport(patients=len(patients))
    for key, size, _ in await asyncio.to_thread(lambda: list(blobs.walk())):
        try:
            data = await asyncio.to_thread(Blob(blobs, key, size).read)
            dataset = pydicom.dcmread(BytesIO(data))
            new = replace(describe(dataset, data, pixel_data_location(data)), blob_key=key)
            pseudonym = str(dataset.PatientID)
        except Exception as exc:  # not an object this archive wrote: reported, not touched
            log.warning("blob %s is not a readable DICOM object: %s", key, type(exc).__name__)
            report.unreadable += 1
            continue
        site, patient = patients.get(pseudonym) or await _unrecorded(
            index, sites, pseudonym, patients, report
        )
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)  # the blob is there already
        await index.store_instance(site, patient, new, "keep-first", done)
        report.instances += 1
    return report


async def _sites(index: Index, blobs: BlobStore, config: Config) -> dict[str, Site]:
    """Sites by SITEID: the recorded ones (their SITEIDs pinned), then the configured ones."""
    recorded = [SiteRecord.decode(data) for _, data in
                await asyncio.to_thread(lambda: list(blobs.records.read("sites")))]
    by_name = {s.name: s for s in config.sites}
    sites = {}
    for record in recorded:
        configured = by_name.get(record.name, SiteConfig(record.name))
        site = await index.ensure_site(replace(configured, siteid=record.siteid))
        sites[site.siteid] = site
    for configured in config.sites:
        if configured.name not in {s.name for s in sites.values()}:
            site = await index.ensure_site(configured)
            sites[site.siteid] = site
    return sites


async def _patients(index: Index, blobs: BlobStore, sites: dict[str, Site]
                    ) -> dict[str, tuple[Site, Patient]]:
    found_records = await asyncio.to_thread(lambda: list(blobs.records.read("patients")))
    records = PatientRecord.merged(PatientRecord.decode(data) for _, data in found_records)
    found = {}
    for record in records:
        site = sites.get(record.siteid)
        if site is None:
            log.warning("a patient record names SITEID %s, which no site has", record.siteid)
            continue
        found[record.pseudonym] = (site, await index.restore_patient(
            site, record.pseudonym, record.date_offset_days, record.patient_key,
            record.issuer_key))
    return found


async def _unrecorded(index: Index, sites: dict[str, Site], pseudonym: str,
                      patients: dict[str, tuple[Site, Patient]], report: RebuildReport
                      ) -> tuple[Site, Patient]:
    """A pseudonym without an allocation record (written before records existed, or lost):
    indexed under a random key, so later objects of that patient get a new pseudonym."""
    site = sites.get(pseudonym.rsplit("-", 1)[0])
    if site is None:
        raise RebuildError("an object's Patient ID is not a pseudonym of a known site")
    patient = await index.restore_patient(site, pseudonym, -1, secrets.token_bytes(32))
    patients[pseudonym] = (site, patient)
    report.patients += 1
    report.patients_without_record += 1
    return site, patient

