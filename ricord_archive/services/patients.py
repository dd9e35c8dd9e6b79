"""Patient identity, one rule for every path that files or finds a patient (ingest over DIMSE
and STOW-RS, imports, `lookup`, the `deid` dry run, clinical sheets).

Within a site a PatientID is unique only within its issuer: a patient is filed under the keyed
hash of (site, IssuerOfPatientID, PatientID), the site's `default_issuer` standing in for a
missing issuer, and under the hash of (site, PatientID) as before when neither names one. A
patient allocated before issuers counted holds only that issuer-less hash: the first issuer
that arrives with its PatientID claims it, a second issuer gets a patient of its own
(`index.store.patient_for`). Original values are hashed here and never stored or logged.
"""

from __future__ import annotations

import asyncio

from ricord_archive.blobstore import BlobStore
from ricord_archive.blobstore.records import PatientRecord
from ricord_archive.config import SiteConfig
from ricord_archive.deid import Keyring, PatientKeys
from ricord_archive.errors import StorageUnavailable
from ricord_archive.index.facade import Index
from ricord_archive.index.store import Patient, PatientEntry, Site

_CACHE_SIZE = 100_000


def patient_keys(
    keys: Keyring, site: Site, site_config: SiteConfig, patient_id: str, issuer: str = ""
) -> PatientKeys:
    """The keyed hashes of the patient an object (or a sheet's row, a `lookup` argument) names
    by its original PatientID and IssuerOfPatientID ("" when it names none)."""
    return keys.patient_keys(site.siteid, patient_id, site_config.issuer_of(issuer))


async def find_patients(
    index: Index, keys: Keyring, site: Site, site_config: SiteConfig,
    wanted: list[tuple[str, str]],
) -> list[Patient | None]:
    """The patient each (PatientID, IssuerOfPatientID) names at the site, None when the index
    does not know it; allocates and claims nothing."""
    return await index.known_patients(
        site, [patient_keys(keys, site, site_config, p, i) for p, i in wanted]
    )


class PatientDirectory:
    """Finds or allocates patients, and keeps their allocation records beside the blobs.
    Pseudonyms and date offsets never change once allocated, so a node keeps what it looked
    up: a cached patient costs one keyed hash and one dict lookup, no database round trip."""

    def __init__(self, index: Index, keys: Keyring, blobs: BlobStore) -> None:
        self.index = index
        self.keys = keys
        self.blobs = blobs
        self._cache: dict[tuple[int, bytes], Patient] = {}

    async def resolve(
        self, site: Site, site_config: SiteConfig, patient_id: str, issuer: str = ""
    ) -> Patient:
        """The patient (PatientID, IssuerOfPatientID) names at the site, claimed or allocated
        on first sight (`issuer` "" when the object names none)."""
        issuer = site_config.issuer_of(issuer)
        key = self.keys.patient_key(site.siteid, patient_id, issuer)
        cached = self._cache.get((site.id, key))
        if cached is None:
            entry = await self.index.patient(
                site, self.keys.patient_keys(site.siteid, patient_id, issuer)
            )
            await self._record(site, entry)  # once per patient and process
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            cached = self._cache[(site.id, key)] = entry.patient
        return cached

    async def _record(self, site: Site, entry: PatientEntry) -> None:
        patient = entry.patient
        record = PatientRecord(site.siteid, patient.pseudonym, entry.patient_key,
                               patient.date_offset_days, entry.issuer_key)
        try:
            await asyncio.to_thread(self.blobs.records.write, record.record_name, record.encode())
        except OSError as exc:  # not the index's fault: say which store failed
            raise StorageUnavailable("the blob store is unavailable; send again later") from exc
