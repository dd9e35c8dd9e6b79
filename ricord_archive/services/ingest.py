"""The one ingest pipeline, for C-STORE and STOW-RS alike.

parse (bounded) -> de-identify -> serialize -> durable blob write -> one index statement in a
transaction of its own, run once the blob is durable -> result. Success is returned only after
the commit; if the transaction fails the new blob is deleted.
A crash can leave an orphan blob, never an index row without its blob.

The hot path is the byte walker (`dicom.tokens.tokenize`, `deid.walker.walk`): one pass over the
encoded object, run inline on the event loop (it takes well under a millisecond). An object it
does not handle takes the pydicom path (`dicom.io.parse`, `deidentify`, `dicom.io.serialize`),
in the executor as before; such an object is never refused for it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import orjson
from pydicom.dataset import Dataset

from ricord_archive import audit_trail
from ricord_archive.blobstore import BlobStore
from ricord_archive.config import Config, Limits, SiteConfig
from ricord_archive.deid import DeidContext, Keyring, deidentify, issuer_of, patient_id_of
from ricord_archive.deid.engine import NO_PATIENT_ID, DeidentificationError
from ricord_archive.deid.policy import check_acceptable, check_values
from ricord_archive.deid.walker import Walked, admitted, walk
from ricord_archive.dicom import io as dicom_io
from ricord_archive.dicom import status as dimse_status
from ricord_archive.dicom.io import PixelDataLocation
from ricord_archive.dicom.json import (
    SERIES_TAGS,
    STUDY_TAGS,
    InstanceRecord,
    index_record,
    instance_path,
    subset,
    to_json,
)
from ricord_archive.dicom.tokens import Parsed, Unhandled, tokenize
from ricord_archive.errors import (
    ArchiveError,
    DuplicateRefused,
    IndexFailure,
    InvalidObject,
    NotFound,
    RefusedObject,
    StorageUnavailable,
    StudyMismatch,
)
from ricord_archive.index.facade import Index
from ricord_archive.index.store import NewInstance, Patient, Site
from ricord_archive.runtime import metrics
from ricord_archive.services.patients import PatientDirectory

log = logging.getLogger(__name__)
T = TypeVar("T")

# Warning "elements discarded": the re-sent object differs and was not stored (first kept).
DUPLICATE_KEPT_WARNING = dimse_status.ELEMENT_DISCARDED
_HASH_ON_LOOP_BYTES = 64 * 1024  # larger blobs are hashed in a thread, beside their write


@dataclass(frozen=True)
class IngestSettings:
    """What ingest needs of the configuration: the sites' policies, the limits, the duplicate
    policy and the project name written into every object."""

    sites: Mapping[str, SiteConfig]  # by name
    limits: Limits
    duplicates: str
    project_name: str

    @staticmethod
    def of(config: Config) -> IngestSettings:
        return IngestSettings({s.name: s for s in config.sites}, config.limits,
                              config.duplicates, config.project_name)


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


def _admit_parsed(parsed: Parsed, site: SiteConfig) -> Admission:
    values = admitted(parsed)
    uids = (values.sop_class_uid, values.sop_uid, values.study_uid)
    try:
        check_values(values.sop_class_uid, values.burned_in_annotation, site.sop_classes)
        if not values.patient_id:
            raise RefusedObject(NO_PATIENT_ID, "no-patient-id")
    except RefusedObject as exc:
        return Admission(*uids, None, exc, None)
    return Admission(*uids, values.patient_id, None, parsed, values.issuer)


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


def prepare_own(dataset: Dataset, limit: int) -> tuple[NewInstance, bytes]:
    """`prepare` of an object the archive built from de-identified data: not de-identified;
    described as read back from its bytes, as the index describes every object."""
    data, pixels = dicom_io.serialize(dataset, str(dataset.file_meta.TransferSyntaxUID))
    return describe(dicom_io.parse(data, limit), data, pixels), data


def describe(
    dataset: Dataset, data: bytes, pixels: PixelDataLocation | None
) -> NewInstance:
    """What the index stores of a de-identified object (`dataset`, written as `data`, its
    pixel data at `pixels`); the blob key is left empty."""
    record = index_record(dataset)
    document = to_json(dataset, instance_path(record.study_uid, record.series_uid, record.sop_uid))
    return _new_instance(record, str(dataset.file_meta.TransferSyntaxUID), data, pixels,
                         document, hashlib.sha256(data).digest())


def _new_instance(
    record: InstanceRecord, syntax: str, data: bytes, pixels: PixelDataLocation | None,
    document: dict[str, Any], sha256: bytes,
) -> NewInstance:
    return NewInstance(
        record=record,
        transfer_syntax_uid=syntax,
        blob_key="",
        size_bytes=len(data),
        sha256=sha256,
        pixel_data=pixels,
        study_json=orjson.dumps(subset(document, STUDY_TAGS)),
        series_json=orjson.dumps(subset(document, SERIES_TAGS)),
        instance_json=orjson.dumps(document),
    )


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def describe_walked(walked: Walked, sha256: bytes | None = None) -> NewInstance:
    """`describe` of an object the byte walker de-identified; the SHA-256 is computed here
    unless given (b"": left for the caller to fill in)."""
    digest = hashlib.sha256(walked.data).digest() if sha256 is None else sha256
    return _new_instance(walked.record, walked.transfer_syntax, walked.data, walked.pixels,
                         walked.document, digest)


@dataclass(frozen=True)
class Admission:
    """What ingest learns of an object before it knows the patient (original identifiers
    stay inside the ingest: they are never stored, logged or answered)."""

    sop_class_uid: str
    sop_uid: str
    study_uid: str
    patient_id: str | None  # None when refused
    refusal: RefusedObject | None
    # The parsed object (the walker's tokens, or pydicom's dataset when kept for a next step
    # in-process); None when refused.
    dataset: Parsed | Dataset | None
    issuer: str = ""  # IssuerOfPatientID, "" when the object names none


def fast_admission(data: bytes, limit: int, site: SiteConfig) -> Admission | None:
    """Admission from the walker's tokens; None when the object takes the pydicom path."""
    dicom_io.check_size(data, limit)
    try:
        return _admit_parsed(tokenize(data), site)
    except Exception as exc:
        _fallback(exc)
        return None


def _fallback(exc: Exception) -> None:
    """Log that the pydicom path takes an object (the reason names no value)."""
    if isinstance(exc, Unhandled):
        log.debug("object takes the pydicom path: %s", exc)
    else:  # a fault of the walker: pydicom is the reference, it decides
        log.warning("the byte walker failed (%s); the pydicom path takes the object",
                    type(exc).__name__)


def admission(data: bytes, limit: int, site: SiteConfig, keep: bool) -> Admission:
    """Parse (bounded) and apply the acceptance policy: by the byte walker when it handles the
    object, else by pydicom, whose parsed dataset is kept if `keep` (not across a process
    boundary: it would be pickled)."""
    fast = fast_admission(data, limit, site)
    if fast is None:
        return pydicom_admission(data, limit, site, keep)
    return fast if keep else replace(fast, dataset=None)


def pydicom_admission(data: bytes, limit: int, site: SiteConfig, keep: bool) -> Admission:
    """`admission` by pydicom alone."""
    dataset = dicom_io.parse(data, limit)
    uids = (str(dataset.SOPClassUID), str(dataset.SOPInstanceUID).strip(),
            str(dataset.StudyInstanceUID).strip())
    kept = dataset if keep else None
    try:
        return Admission(*uids, admit(dataset, site), None, kept, issuer_of(dataset))
    except RefusedObject as exc:
        return Admission(*uids, None, exc, None)
    except ArchiveError:
        raise
    except Exception as exc:  # pydicom decodes values lazily: a broken value surfaces here
        raise InvalidObject(f"unprocessable DICOM object ({type(exc).__name__})") from exc


def prepare_object(
    source: bytes | Parsed | Dataset, limit: int, context: DeidContext
) -> tuple[NewInstance, bytes]:
    """`prepare` of the object's bytes (parsed here by pydicom, e.g. in a worker process), or
    of what `admission` parsed: the walker's tokens (the pydicom path if the walker gives up
    on them) or a pydicom dataset."""
    if isinstance(source, Parsed):
        walked = walk_or_none(source, context)
        if walked is not None:
            return describe_walked(walked), walked.data
        source = source.data
    return prepare(dicom_io.parse(source, limit) if isinstance(source, bytes) else source,
                   context)


def walk_or_none(parsed: Parsed, context: DeidContext) -> Walked | None:
    """The walker's de-identification, or None when the pydicom path must take the object."""
    try:
        return walk(parsed, context)
    except Exception as exc:
        _fallback(exc)
        return None


class IngestService:
    """Runs the pipeline. The byte walker's work runs inline on the event loop (cheaper than
    handing it to a process pool, where pickling the object both ways alone costs the loop
    about as much: bench/ingest_cpu.py); the blob's write and SHA-256 are `_write`'s. Objects
    the walker does not handle go to `executor` (a process pool, so pydicom uses every core and
    never holds the event loop's GIL), else threads."""

    def __init__(
        self, index: Index, blobs: BlobStore, keys: Keyring, sites: dict[str, Site],
        config: IngestSettings, executor: Executor | None = None,
        trail: audit_trail.AuditTrail = audit_trail.NO_AUDIT,
    ) -> None:
        self.index = index
        self.blobs = blobs
        self.keys = keys
        self.sites = sites
        self.config = config  # the settings of ingest only (no Config)
        self.executor = executor
        self.trail = trail
        self.patients = PatientDirectory(index, keys, blobs)
        self._storing = 0  # stores of this process in progress, past their admission

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    async def store(
        self, data: bytes, site_name: str, study_uid: str | None = None, *,
        by: audit_trail.Actor, protocol: str,
    ) -> StoreResult:
        """Store one Part 10 object for a site; `study_uid` is the STOW-RS target study, if any.
        The outcome, stored or not, goes to the audit trail as coming from `by` over
        `protocol`; the result or the error passes through."""
        return await audit_trail.storing(self.trail, by, protocol, site_name,
                                   self._store(data, site_name, study_uid))

    async def _store(self, data: bytes, site_name: str, study_uid: str | None) -> StoreResult:
        site = self.sites[site_name]
        limit = self.config.limits.max_object_bytes
        site_config = self.config.sites[site.name]
        admitted = fast_admission(data, limit, site_config)  # inline: a tenth of a millisecond
        if admitted is None:
            admitted = await self._run(
                pydicom_admission, data, limit, site_config, self.executor is None
            )
        self._storing += 1
        try:
            return await self._store_admitted(data, admitted, site, site_config, study_uid)
        except ArchiveError as exc:  # name the object by the UID it would have had here
            exc.sop_class_uid = admitted.sop_class_uid
            exc.sop_uid = self.keys.uid(site.siteid, admitted.sop_uid)
            if isinstance(exc, RefusedObject):
                await self._count_refusal(site, exc)
            raise
        finally:
            self._storing -= 1

    def _hash_and_write(self, key: str, blob: bytes) -> bytes:
        """The SHA-256, then the durable write; the digest."""
        digest = _sha256(blob)
        self.blobs.write(key, blob)
        return digest

    def _write(self, key: str, blob: bytes) -> tuple[asyncio.Future[Any], Awaitable[bytes]]:
        """The blob's durable write, started, and its SHA-256. While other stores of this
        process are in progress, one thread hashes then writes (one hand-off: the cores are
        busy anyway). Alone, a quick write (a small blob into reserved local space) is done at
        once on the loop: the hand-off to a thread and back costs more than the write; a large
        blob is hashed in a second thread while the first writes it (hashlib lets go of the
        GIL), so the 0.44 ms that hashing 527 KB takes no longer precede the write
        (bench/RESULTS.md)."""
        if self._storing > 1:
            both = asyncio.ensure_future(asyncio.to_thread(self._hash_and_write, key, blob))
            return both, both
        loop = asyncio.get_running_loop()
        written: asyncio.Future[None]
        if self.blobs.quick(key, len(blob)):
            written = loop.create_future()
            try:
                self.blobs.write(key, blob)
                written.set_result(None)
            except Exception as exc:
                written.set_exception(exc)
        else:
            written = asyncio.ensure_future(asyncio.to_thread(self.blobs.write, key, blob))
        if len(blob) > _HASH_ON_LOOP_BYTES:
            return written, asyncio.ensure_future(asyncio.to_thread(_sha256, blob))
        digest: asyncio.Future[bytes] = loop.create_future()
        digest.set_result(_sha256(blob))
        return written, digest

    async def _discard(self, written: asyncio.Future[Any], key: str) -> None:
        """Remove the blob of an instance that was not indexed, once its write has ended (if
        the store refuses, the orphan collector removes it later)."""
        try:
            await written
        except OSError:
            metrics.BLOB_ERRORS.labels("write").inc()
        except Exception:
            pass
        try:
            await asyncio.to_thread(self.blobs.delete, key)
        except OSError as exc:
            metrics.BLOB_ERRORS.labels("delete").inc()
            log.warning("could not remove the blob of an object not stored (%s): left to the "
                        "orphan collector", type(exc).__name__)

    async def _count_refusal(self, site: Site, refusal: RefusedObject) -> None:
        log.info("refused an object from site %s: %s", site.name, refusal.reason)
        try:
            await self.index.count_refusal(site, refusal.reason)
        except IndexFailure as exc:
            log.warning("could not count a refusal: %s", type(exc).__name__)

    async def _store_admitted(
        self, data: bytes, admitted: Admission, site: Site, site_config: SiteConfig,
        study_uid: str | None,
    ) -> StoreResult:
        if admitted.refusal is not None:
            raise admitted.refusal
        if study_uid is not None and study_uid not in (
            admitted.study_uid, self.keys.uid(site.siteid, admitted.study_uid)
        ):
            raise StudyMismatch("the object belongs to another study than the request URL")
        assert admitted.patient_id is not None  # only a refused object has none
        try:
            patient = await self.patients.resolve(
                site, site_config, admitted.patient_id, admitted.issuer
            )
        except IndexFailure as exc:
            raise StorageUnavailable("the index is unavailable; send again later") from exc
        context = DeidContext(
            site.siteid, patient.pseudonym, patient.date_offset_days, self.keys,
            self.config.project_name,
        )
        walked = None
        if isinstance(admitted.dataset, Parsed):  # the hot path, inline on the loop
            walked = walk_or_none(admitted.dataset, context)
        key = self.blobs.new_key()
        written: asyncio.Future[Any]
        if walked is not None:
            written, digest = self._write(key, walked.data)
        else:
            source = admitted.dataset if isinstance(admitted.dataset, Dataset) else data
            new, blob = await self._run(
                prepare_object, source, self.config.limits.max_object_bytes, context,
            )
            written = asyncio.ensure_future(asyncio.to_thread(self.blobs.write, key, blob))
        try:
            if walked is not None:  # the index statement waits for the durable write
                new = describe_walked(walked, await digest)
            new = replace(new, blob_key=key)
            row = await self.index.store_instance(
                site, patient, new, self.config.duplicates, written
            )
        except BaseException as exc:
            await self._discard(written, key)
            if isinstance(exc, OSError):
                raise StorageUnavailable("the blob store is unavailable; send again later") \
                    from exc
            if isinstance(exc, IndexFailure):
                raise StorageUnavailable("the index is unavailable; send again later") from exc
            raise
        rec = new.record
        if row.outcome != "duplicate":
            metrics.STORED_BYTES.labels(site.name).inc(new.size_bytes)
        result = StoreResult(rec.study_uid, rec.series_uid, rec.sop_uid, rec.sop_class_uid,
                             duplicate=row.outcome != "inserted")
        if row.outcome == "replaced":
            log.info("instance %s overwritten by a re-send with other content", rec.sop_uid)
            assert row.replaced_blob_key is not None  # a replaced row names its old blob
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

    async def store_own(self, dataset: Dataset, *, by: audit_trail.Actor, protocol: str) -> str:
        """Store an object the archive built itself, only from de-identified instances it holds
        (a label SEG or SR): not de-identified again, filed under the site and patient of its
        study, which the archive must hold, and replacing the object stored before under its
        SOP Instance UID. Objects from outside never come here: `store` takes them, as bytes;
        this takes in-process datasets, and only those naming their study's pseudonym.
        The outcome: 'inserted', 'replaced', or 'duplicate' (stored before as it is); audited
        as `store` is."""
        site: Site | None = None
        try:
            owner = await self.index.study_owner(str(dataset.StudyInstanceUID))
            if owner is None:
                raise NotFound("no such study")
            site = owner[0]
            outcome = await self._store_own(dataset, *owner)
        except Exception as exc:
            self.trail.record(audit_trail.instance_refused(
                by, protocol, site.name if site is not None else None, exc))
            raise
        self.trail.record(audit_trail.instance_stored(by, protocol, site.name, StoreResult(
            str(dataset.StudyInstanceUID), str(dataset.SeriesInstanceUID),
            str(dataset.SOPInstanceUID), str(dataset.SOPClassUID),
            duplicate=outcome == "duplicate",
        )))
        return outcome

    async def _store_own(self, dataset: Dataset, site: Site, patient: Patient) -> str:
        if dataset.get("PatientID") != patient.pseudonym:
            raise InvalidObject("the object does not name its study's pseudonymous patient")
        new, data = await asyncio.to_thread(
            prepare_own, dataset, self.config.limits.max_object_bytes)
        key = self.blobs.new_key()
        written = asyncio.ensure_future(asyncio.to_thread(self.blobs.write, key, data))
        try:
            row = await self.index.store_instance(site, patient, replace(new, blob_key=key),
                                                  "overwrite", written)
        except BaseException as exc:
            await self._discard(written, key)
            if isinstance(exc, (OSError, IndexFailure)):
                raise StorageUnavailable("the archive's storage is unavailable; try again "
                                         "later") from exc
            raise
        if row.outcome != "inserted":  # replaced (its old blob goes) or unchanged (the new one)
            await asyncio.to_thread(self.blobs.delete, row.replaced_blob_key or key)
        return row.outcome
