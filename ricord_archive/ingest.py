"""The one ingest pipeline, for C-STORE and STOW-RS alike.

parse (bounded) -> de-identify -> serialize -> write blob -> one index transaction -> result.
Success is returned only after the commit; if the transaction fails the new blob is deleted.
A crash can leave an orphan blob, never an index row without its blob.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, replace

import asyncpg
import orjson
from pydicom.dataset import Dataset

from ricord_archive import dicom_io
from ricord_archive.blobstore import BlobStore
from ricord_archive.config import Config, SiteConfig
from ricord_archive.deid import DeidContext, Keyring, deidentify, patient_id_of
from ricord_archive.deid.engine import DeidentificationError
from ricord_archive.deid.policy import check_acceptable
from ricord_archive.dicom_json import (
    SERIES_TAGS,
    STUDY_TAGS,
    index_record,
    instance_path,
    subset,
    to_json,
)
from ricord_archive.errors import (
    ArchiveError,
    InvalidObject,
    RefusedObject,
    StorageUnavailable,
    StudyMismatch,
)
from ricord_archive.index.store import (
    NewInstance,
    Patient,
    Site,
    count_refusal,
    patient_for,
    store_instance,
)

log = logging.getLogger(__name__)

_PATIENT_CACHE_SIZE = 100_000
_DATABASE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError)


@dataclass(frozen=True)
class StoreResult:
    """A stored (or already stored) instance, by its de-identified UIDs."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    duplicate: bool


def admit(dataset: Dataset, site: SiteConfig) -> str:
    """Apply the acceptance policy; return the original PatientID the object is filed under."""
    check_acceptable(dataset, site.sop_classes)
    try:
        return patient_id_of(dataset)
    except DeidentificationError as exc:
        raise RefusedObject(str(exc), "no-patient-id") from exc


def prepare(dataset: Dataset, context: DeidContext) -> tuple[NewInstance, bytes]:
    """CPU work: de-identify, serialize, and compute what the index stores (blob key left empty)
    and the bytes to write."""
    transfer_syntax = str(dataset.file_meta.TransferSyntaxUID)
    try:
        deidentify(dataset, context)
        data, pixels = dicom_io.serialize(dataset, transfer_syntax)
        record = index_record(dataset)
        document = to_json(
            dataset, instance_path(record.study_uid, record.series_uid, record.sop_uid)
        )
    except ArchiveError:
        raise
    except Exception as exc:  # pydicom decodes values lazily: a broken value surfaces here
        log.info("object rejected while de-identifying: %s", type(exc).__name__)
        raise InvalidObject(f"unprocessable DICOM object ({type(exc).__name__})") from exc
    return NewInstance(
        record=record,
        transfer_syntax_uid=transfer_syntax,
        blob_key="",
        size_bytes=len(data),
        sha256=hashlib.sha256(data).digest(),
        pixel_data=pixels,
        study_json=orjson.dumps(subset(document, STUDY_TAGS)),
        series_json=orjson.dumps(subset(document, SERIES_TAGS)),
        instance_json=orjson.dumps(document),
    ), data


class IngestService:
    def __init__(
        self, pool: asyncpg.Pool, blobs: BlobStore, keys: Keyring, sites: dict[str, Site],
        config: Config,
    ) -> None:
        self.pool = pool
        self.blobs = blobs
        self.keys = keys
        self.sites = sites
        self.config = config
        # Patient rows never change once allocated, so a node may keep what it has looked up.
        self._patients: dict[tuple[int, bytes], Patient] = {}

    async def store(self, data: bytes, site_name: str, study_uid: str | None = None) -> StoreResult:
        """Store one Part 10 object for a site; `study_uid` is the STOW-RS target study, if any."""
        site = self.sites[site_name]
        limit = self.config.limits.max_object_bytes
        dataset = await asyncio.to_thread(dicom_io.parse, data, limit)
        sop_class_uid = str(dataset.SOPClassUID)
        original_sop_uid = str(dataset.SOPInstanceUID).strip()
        try:
            return await self._store_parsed(dataset, site, study_uid)
        except ArchiveError as exc:  # name the object by the UID it would have had here
            exc.sop_class_uid = sop_class_uid
            exc.sop_uid = self.keys.uid(site.siteid, original_sop_uid)
            if isinstance(exc, RefusedObject):
                await self._count_refusal(site, exc)
            raise

    async def _patient(self, site: Site, patient_key: bytes) -> Patient:
        cached = self._patients.get((site.id, patient_key))
        if cached is None:
            cached = await patient_for(self.pool, site, patient_key)
            if len(self._patients) >= _PATIENT_CACHE_SIZE:
                self._patients.clear()
            self._patients[(site.id, patient_key)] = cached
        return cached

    async def _count_refusal(self, site: Site, refusal: RefusedObject) -> None:
        log.info("refused an object from site %s: %s", site.name, refusal.reason)
        try:
            await count_refusal(self.pool, site, refusal.reason)
        except _DATABASE_ERRORS as exc:
            log.warning("could not count a refusal: %s", type(exc).__name__)

    async def _store_parsed(
        self, dataset: Dataset, site: Site, study_uid: str | None
    ) -> StoreResult:
        patient_id = admit(dataset, self.config.site_named(site.name))
        if study_uid is not None:
            original = str(dataset.StudyInstanceUID).strip()
            if study_uid not in (original, self.keys.uid(site.siteid, original)):
                raise StudyMismatch("the object belongs to another study than the request URL")
        try:
            patient = await self._patient(site, self.keys.patient_key(site.siteid, patient_id))
        except _DATABASE_ERRORS as exc:
            raise StorageUnavailable("the index is unavailable; send again later") from exc
        context = DeidContext(
            site.siteid, patient.pseudonym, patient.date_offset_days, self.keys,
            self.config.project_name,
        )
        new, blob = await asyncio.to_thread(prepare, dataset, context)
        try:
            key = await asyncio.to_thread(self.blobs.put, blob)
        except OSError as exc:
            raise StorageUnavailable("the blob store is unavailable; send again later") from exc
        new = replace(new, blob_key=key)
        try:
            row = await store_instance(self.pool, site, patient, new)
        except BaseException as exc:
            await asyncio.to_thread(self.blobs.delete, key)
            if isinstance(exc, _DATABASE_ERRORS):
                raise StorageUnavailable("the index is unavailable; send again later") from exc
            raise
        if not row.inserted:
            await asyncio.to_thread(self.blobs.delete, key)
            if row.sha256 != new.sha256:
                log.warning("instance %s re-sent with different content; first kept",
                            new.record.sop_uid)
        rec = new.record
        return StoreResult(
            rec.study_uid, rec.series_uid, rec.sop_uid, rec.sop_class_uid, not row.inserted
        )
