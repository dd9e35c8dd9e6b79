"""The index as the services see it (Orthanc's ServerIndex is the model): one object built
from the pool, which owns the transactions, speaks domain types (sites, patients, instances)
and fails with `errors.IndexFailure` / `IndexUnavailable`, never the driver's errors.

Its parts beyond the instances are small facades of their own: `audit` (the audit trail's
rows), `imports` (import sessions), `cohorts`, `clinical` and `labels`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from contextlib import AbstractAsyncContextManager

from ricord_archive.config import SiteConfig
from ricord_archive.deid.keys import PatientKeys
from ricord_archive.index import maintenance, reads, store
from ricord_archive.index.audit_rows import AuditRows
from ricord_archive.index.clinical import ClinicalRows
from ricord_archive.index.cohorts import CohortRows
from ricord_archive.index.database import Pool
from ricord_archive.index.import_rows import ImportRows
from ricord_archive.index.labels import LabelRows
from ricord_archive.index.replica import Reads
from ricord_archive.index.search import Page, search
from ricord_archive.index.store import NewInstance, Patient, PatientEntry, Site, StoredRow
from ricord_archive.instances import StoredInstance
from ricord_archive.search.model import Query


class Index:
    """The index of one archive, over its connection pool; searches and metadata go to
    `replica` (a read replica when one is configured), everything else to the primary."""

    def __init__(self, pool: Pool, replica: Reads | None = None) -> None:
        self._pool = pool
        self._reads = replica or Reads(pool)
        self.audit = AuditRows(pool)
        self.imports = ImportRows(pool)
        self.cohorts = CohortRows(pool)
        self.clinical = ClinicalRows(pool)
        self.labels = LabelRows(pool)
        self._study_keys = reads.StudyKeys()

    async def ensure_site(self, site: SiteConfig) -> Site:
        """The index row of a configured site, created with a SITEID on first use."""
        return await store.ensure_site(self._pool, site)

    async def patient(self, site: Site, keys: PatientKeys) -> PatientEntry:
        """The patient `keys` names at the site, claimed or allocated on first sight."""
        return await store.patient_for(self._pool, site, keys)

    async def store_instance(
        self, site: Site, patient: Patient, new: NewInstance, on_conflict: str,
        blob_written: Awaitable[object],
    ) -> StoredRow:
        """Index one instance once its blob is written (`store.store_instance`): the blob
        write's own error (an OSError) passes through as it is."""
        return await store.store_instance(self._pool, site, patient, new, on_conflict,
                                          blob_written)

    async def study_owner(self, study_uid: str) -> tuple[Site, Patient] | None:
        """The site and patient a stored study is filed under; None when not held."""
        return await reads.study_owner(self._pool, study_uid)

    async def known_patients(self, site: Site, wanted: list[PatientKeys]
                             ) -> list[Patient | None]:
        """The patient each of `wanted` names at the site, allocating and claiming nothing
        (`reads.known_patients`)."""
        return await reads.known_patients(self._pool, site, wanted)

    async def site_named(self, name: str) -> Site | None:
        """A site's row by its configured name; None before the archive first created it."""
        return await reads.site_by_name(self._pool, name)

    async def refusal_counts(self) -> list[tuple[str, str, int]]:
        """(site name, reason, count) for every refusal reason seen."""
        return await store.refusal_counts(self._pool)

    async def count_refusal(self, site: Site, reason: str) -> None:
        """One more refusal for `reason` at the site."""
        await store.count_refusal(self._pool, site, reason)

    async def search(self, query: Query, fresh: bool = False) -> Page:
        """A page of the query's matches; `fresh`: asked of the primary, never of a read
        replica that may lag behind."""
        if fresh:
            return await search(self._pool, query)
        return await self._reads.run(lambda pool: search(pool, query))

    async def stored_instances(self, *uids: str, site_id: int | None = None
                               ) -> list[StoredInstance]:
        """The instances of a study, series or instance (`reads.stored_instances`), on the
        primary: where the bytes are."""
        return await reads.stored_instances(self._pool, *uids, site_id=site_id,
                                            keys=self._study_keys)

    async def instance_metadata(self, *uids: str, site_id: int | None = None) -> list[bytes]:
        """The stored DICOM JSON of each instance in scope (`reads.instance_metadata`)."""
        return await self._reads.run(
            lambda pool: reads.instance_metadata(pool, *uids, site_id=site_id,
                                                 keys=self._study_keys))

    def instance_blobs(self) -> AsyncIterator[tuple[str, str, int]]:
        """(SOP Instance UID, blob key, size) of every indexed instance, in one transaction."""
        return maintenance.instance_blobs(self._pool)

    def advisory_lock(self, key: int) -> AbstractAsyncContextManager[bool]:
        """Whether this process took the advisory lock `key`, held until the block ends."""
        return maintenance.advisory_lock(self._pool, key)

    async def is_empty(self) -> bool:
        """Whether the index holds no instance (rebuilding it)."""
        return await maintenance.is_empty(self._pool)

    async def restore_patient(self, site: Site, pseudonym: str, offset: int, key: bytes | None,
                              issuer_key: bytes | None = None) -> Patient:
        """A patient as its allocation record has it (`maintenance.restore_patient`)."""
        return await maintenance.restore_patient(self._pool, site, pseudonym, offset, key,
                                                 issuer_key)
