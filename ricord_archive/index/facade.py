"""The index as the services see it (Orthanc's ServerIndex is the model): one object built
from the pool, which owns the transactions, speaks domain types (sites, patients, instances)
and fails with `errors.IndexFailure` / `IndexUnavailable`, never the driver's errors.

Ingest goes through it; the other services still call the `index/` modules with the pool
(docs/architecture.md)."""

from __future__ import annotations

from collections.abc import Awaitable

from ricord_archive.deid.keys import PatientKeys
from ricord_archive.index import reads, store
from ricord_archive.index.database import Pool
from ricord_archive.index.store import NewInstance, Patient, PatientEntry, Site, StoredRow


class Index:
    """The index of one archive, over its connection pool."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

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

    async def count_refusal(self, site: Site, reason: str) -> None:
        """One more refusal for `reason` at the site."""
        await store.count_refusal(self._pool, site, reason)
