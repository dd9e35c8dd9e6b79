"""The one ingest pipeline, for C-STORE and STOW-RS alike.

parse (bounded) -> de-identify -> serialize -> write the blob, and meanwhile one index
transaction that commits only after the blob is durable -> result. Success is returned only
after the commit; if the transaction fails the new blob is deleted.
A crash can leave an orphan blob, never an index row without its blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import asyncpg
import orjson
from pydicom.dataset import Dataset

from ricord_archive import dicom_io
from ricord_archive.blobstore import BlobStore
from ricord_archive.config import Config, SiteConfig
from ricord_archive.deid import DeidContext, Keyring, deidentify, patient_id_of
from ricord_archive.deid.engine import DeidentificationError
from ricord_archive.deid.policy import check_acceptable
from ricord_archive.dicom_io import PixelDataLocation
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
    DuplicateRefused,
    InvalidObject,
    RefusedObject,
    StorageUnavailable,
    StudyMismatch,
)
from ricord_archive.index.database import DATABASE_UNAVAILABLE
from ricord_archive.index.store import (
    NewInstance,
    Patient,
    Site,
    count_refusal,
    patient_for,
    store_instance,
)
from ricord_archive.records import PatientRecord

log = logging.getLogger(__name__)
T = TypeVar("T")

_PATIENT_CACHE_SIZE = 100_000
# Warning "elements discarded": the re-sent object differs and was not stored (first kept).
DUPLICATE_KEPT_WARNING = 0xB006
_DATABASE_ERRORS = (asyncpg.PostgresError, *DATABASE_UNAVAILABLE)


@dataclass(frozen=True)
class StoreResult:
    """A stored (or already stored) instance, by its de-identified UIDs."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    duplicate: bool
    warning: int | None = None  # a warning status: the object was not stored as sent


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
        return describe(dataset, data, pixels), data
    except ArchiveError:
        raise
    except Exception as exc:  # pydicom decodes values lazily: a broken value surfaces here
        log.info("object rejected while de-identifying: %s", type(exc).__name__)
        raise InvalidObject(f"unprocessable DICOM object ({type(exc).__name__})") from exc


def describe(
    dataset: Dataset, data: bytes, pixels: PixelDataLocation | None
) -> NewInstance:
    """What the index stores of a de-identified object (`dataset`, written as `data`, its
    pixel data at `pixels`); the blob key is left empty."""
    record = index_record(dataset)
    document = to_json(dataset, instance_path(record.study_uid, record.series_uid, record.sop_uid))
    return NewInstance(
        record=record,
        transfer_syntax_uid=str(dataset.file_meta.TransferSyntaxUID),
        blob_key="",
        size_bytes=len(data),
        sha256=hashlib.sha256(data).digest(),
        pixel_data=pixels,
        study_json=orjson.dumps(subset(document, STUDY_TAGS)),
        series_json=orjson.dumps(subset(document, SERIES_TAGS)),
        instance_json=orjson.dumps(document),
    )


@dataclass(frozen=True)
class Admission:
    """What ingest learns of an object before it knows the patient (original identifiers
    stay inside the ingest: they are never stored, logged or answered)."""

    sop_class_uid: str
    sop_uid: str
    study_uid: str
    patient_id: str | None  # None when refused
    refusal: RefusedObject | None
    dataset: Dataset | None  # the parsed object, kept when the next step runs in-process


def admission(data: bytes, limit: int, site: SiteConfig, keep: bool) -> Admission:
    """Parse (bounded) and apply the acceptance policy; the parsed dataset is kept if `keep`
    (not across a process boundary: it would be pickled)."""
    dataset = dicom_io.parse(data, limit)
    uids = (str(dataset.SOPClassUID), str(dataset.SOPInstanceUID).strip(),
            str(dataset.StudyInstanceUID).strip())
    kept = dataset if keep else None
    try:
        return Admission(*uids, admit(dataset, site), None, kept)
    except RefusedObject as exc:
        return Admission(*uids, None, exc, None)


def prepare_object(
    source: bytes | Dataset, limit: int, context: DeidContext
) -> tuple[NewInstance, bytes]:
    """`prepare` of the object's bytes (parsed here, e.g. in a worker process) or of the
    dataset already parsed by `admission`."""
    return prepare(dicom_io.parse(source, limit) if isinstance(source, bytes) else source,
                   context)


class IngestService:
    """Runs the pipeline. CPU and disk work goes to `executor` (a process pool, so
    de-identification uses every core and never holds the event loop's GIL), else threads."""

    def __init__(
        self, pool: asyncpg.Pool, blobs: BlobStore, keys: Keyring, sites: dict[str, Site],
        config: Config, executor: Executor | None = None,
    ) -> None:
        self.pool = pool
        self.blobs = blobs
        self.keys = keys
        self.sites = sites
        self.config = config
        self.executor = executor
        # Patient rows never change once allocated, so a node may keep what it has looked up.
        self._patients: dict[tuple[int, bytes], Patient] = {}

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    async def store(self, data: bytes, site_name: str, study_uid: str | None = None) -> StoreResult:
        """Store one Part 10 object for a site; `study_uid` is the STOW-RS target study, if any."""
        site = self.sites[site_name]
        limit = self.config.limits.max_object_bytes
        admitted = await self._run(
            admission, data, limit, self.config.site_named(site.name), self.executor is None
        )
        try:
            return await self._store_admitted(data, admitted, site, study_uid)
        except ArchiveError as exc:  # name the object by the UID it would have had here
            exc.sop_class_uid = admitted.sop_class_uid
            exc.sop_uid = self.keys.uid(site.siteid, admitted.sop_uid)
            if isinstance(exc, RefusedObject):
                await self._count_refusal(site, exc)
            raise

    async def _patient(self, site: Site, patient_key: bytes) -> Patient:
        cached = self._patients.get((site.id, patient_key))
        if cached is None:
            cached = await patient_for(self.pool, site, patient_key)
            record = PatientRecord(site.siteid, cached.pseudonym, patient_key,
                                   cached.date_offset_days)  # once per patient and process
            await asyncio.to_thread(self.blobs.write_record, record.record_name, record.encode())
            if len(self._patients) >= _PATIENT_CACHE_SIZE:
                self._patients.clear()
            self._patients[(site.id, patient_key)] = cached
        return cached

    async def _discard(self, written: asyncio.Future[None], key: str) -> None:
        """Remove the blob of an instance that was not indexed, once its write has ended."""
        with contextlib.suppress(Exception):
            await written
        await asyncio.to_thread(self.blobs.delete, key)

    async def _count_refusal(self, site: Site, refusal: RefusedObject) -> None:
        log.info("refused an object from site %s: %s", site.name, refusal.reason)
        try:
            await count_refusal(self.pool, site, refusal.reason)
        except _DATABASE_ERRORS as exc:
            log.warning("could not count a refusal: %s", type(exc).__name__)

    async def _store_admitted(
        self, data: bytes, admitted: Admission, site: Site, study_uid: str | None
    ) -> StoreResult:
        if admitted.refusal is not None:
            raise admitted.refusal
        if study_uid is not None and study_uid not in (
            admitted.study_uid, self.keys.uid(site.siteid, admitted.study_uid)
        ):
            raise StudyMismatch("the object belongs to another study than the request URL")
        try:
            patient = await self._patient(
                site, self.keys.patient_key(site.siteid, admitted.patient_id)
            )
        except _DATABASE_ERRORS as exc:
            raise StorageUnavailable("the index is unavailable; send again later") from exc
        except OSError as exc:
            raise StorageUnavailable("the blob store is unavailable; send again later") from exc
        context = DeidContext(
            site.siteid, patient.pseudonym, patient.date_offset_days, self.keys,
            self.config.project_name,
        )
        new, blob = await self._run(
            prepare_object, admitted.dataset or data, self.config.limits.max_object_bytes,
            context,
        )
        new = replace(new, blob_key=self.blobs.new_key())
        written = asyncio.ensure_future(asyncio.to_thread(self.blobs.write, new.blob_key, blob))
        try:
            row = await store_instance(
                self.pool, site, patient, new, self.config.duplicates, written
            )
        except BaseException as exc:
            await self._discard(written, new.blob_key)
            if isinstance(exc, OSError):
                raise StorageUnavailable("the blob store is unavailable; send again later") \
                    from exc
            if isinstance(exc, _DATABASE_ERRORS):
                raise StorageUnavailable("the index is unavailable; send again later") from exc
            raise
        rec = new.record
        result = StoreResult(rec.study_uid, rec.series_uid, rec.sop_uid, rec.sop_class_uid,
                             duplicate=row.outcome != "inserted")
        if row.outcome == "replaced":
            log.info("instance %s overwritten by a re-send with other content", rec.sop_uid)
            await asyncio.to_thread(self.blobs.delete, row.replaced_blob_key)
            return result
        if row.outcome == "duplicate":
            await asyncio.to_thread(self.blobs.delete, new.blob_key)
            if row.sha256 != new.sha256:
                log.warning("instance %s re-sent with other content: %s", rec.sop_uid,
                            "refused" if self.config.duplicates == "reject" else "first kept")
                if self.config.duplicates == "reject":
                    raise DuplicateRefused(
                        "this SOP Instance UID is already stored with other content"
                    )
                return replace(result, warning=DUPLICATE_KEPT_WARNING)
        return result
