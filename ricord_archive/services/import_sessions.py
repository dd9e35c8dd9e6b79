"""The import-session service: while `ricord-archive import-pacs` moves studies out of a PACS,
objects that arrive from the PACS's calling AE title for an expected study are filed under the
importing site, on whichever node receives them.

Sessions live in PostgreSQL (every node sees them); a study is registered by a keyed hash of
its original StudyInstanceUID, so the index holds no original identifier. A session that its
importer never closed expires after `SESSION_TTL_SECONDS` without a new registration.
"""

from __future__ import annotations

from ricord_archive.deid import Keyring
from ricord_archive.index.facade import Index
from ricord_archive.index.import_rows import SessionStudy, StudyCounts
from ricord_archive.index.store import Site

SESSION_TTL_SECONDS = 6 * 3600.0

__all__ = ["SESSION_TTL_SECONDS", "ImportSessions", "SessionStudy", "StudyCounts"]


class ImportSessions:
    def __init__(self, index: Index, keys: Keyring) -> None:
        self.index = index
        self.keys = keys

    def study_key(self, original_study_uid: str) -> bytes:
        return self.keys.digest("import-study", original_study_uid.strip())

    async def open(self, site: Site, calling_aet: str) -> int:
        """A new session: objects from `calling_aet` for its expected studies go to `site`."""
        return await self.index.imports.open_session(site.id, calling_aet, SESSION_TTL_SECONDS)

    async def expect(self, session_id: int, original_study_uids: list[str]) -> None:
        """Register studies about to be moved (their counts restart) and renew the session."""
        keys = [self.study_key(uid) for uid in original_study_uids]
        await self.index.imports.expect_studies(session_id, keys, SESSION_TTL_SECONDS)

    async def close(self, session_id: int) -> None:
        await self.index.imports.close_session(session_id)

    async def calling_aets(self) -> list[str]:
        """Calling AE titles that active sessions expect objects from."""
        return await self.index.imports.importing_aets()

    async def study(self, calling_aet: str, original_study_uid: str) -> SessionStudy | None:
        """The session expecting this study from this calling AE title, if any."""
        return await self.index.imports.session_study(
            calling_aet, self.study_key(original_study_uid))

    async def count(self, study: SessionStudy, outcome: str) -> None:
        """Count one object's outcome: stored, duplicates, refused or failed."""
        await self.index.imports.count_outcome(study, outcome)

    async def counts(self, session_id: int, original_study_uid: str) -> StudyCounts:
        return await self.index.imports.study_counts(
            session_id, self.study_key(original_study_uid))
