"""`ricord-archive deid`: de-identify files offline exactly as ingest would, as a dry run.

Each file goes through ingest's own pure steps (`ingest.admission`, `ingest.prepare_object`:
the byte walker, or pydicom for what the walker does not handle), so UIDs, accession numbers
and study IDs come out as the archive will make them. Pseudonyms are read from the index, never
allocated: a patient the index already knows at the site gets its pseudonym and date offset; any
other gets a provisional pseudonym `<SITEID>-DRYRUN-<n>` (numbered in order of first appearance)
and a provisional date offset from a keyed hash, stable from one dry run to the next.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ricord_archive.archive import open_index
from ricord_archive.config import Config, SiteConfig
from ricord_archive.deid import DeidContext, Keyring
from ricord_archive.errors import ArchiveError, RefusedObject
from ricord_archive.index.facade import Index
from ricord_archive.index.store import DATE_OFFSET_MAX_DAYS, Site
from ricord_archive.runtime.secret import load_secret
from ricord_archive.services.ingest import admission, prepare_object
from ricord_archive.services.patients import find_patients
from ricord_archive.tools import ToolError, indexed_site

PROVISIONAL_MARK = "DRYRUN"


def provisional_date_offset(keys: Keyring, siteid: str, patient_id: str, issuer: str = "") -> int:
    """A stand-in for the offset the index draws on first sight: days back, non-zero, in the
    same range, and the same in every dry run."""
    digest = keys.digest("dry-run-date-offset-issuer", siteid, issuer, patient_id) if issuer \
        else keys.digest("dry-run-date-offset", siteid, patient_id)
    return -(1 + int.from_bytes(digest[:8], "big") % DATE_OFFSET_MAX_DAYS)


class Pseudonyms:
    """Pseudonym and date offset per original (PatientID, IssuerOfPatientID) at one site, read
    from the index by ingest's rule (`patients`)."""

    def __init__(
        self, index: Index, site: Site, site_config: SiteConfig, keys: Keyring
    ) -> None:
        self.index = index
        self.site = site
        self.site_config = site_config
        self.keys = keys
        self.known = 0
        self.provisional = 0
        self._seen: dict[tuple[str, str], tuple[str, int]] = {}

    async def of(self, patient_id: str, issuer: str = "") -> tuple[str, int]:
        issuer = self.site_config.issuer_of(issuer)
        if (patient_id, issuer) not in self._seen:
            siteid = self.site.siteid
            [patient] = await find_patients(self.index, self.keys, self.site, self.site_config,
                                            [(patient_id, issuer)])
            if patient is not None:
                self.known += 1
                self._seen[patient_id, issuer] = (patient.pseudonym, patient.date_offset_days)
            else:
                self.provisional += 1
                self._seen[patient_id, issuer] = (
                    f"{siteid}-{PROVISIONAL_MARK}-{self.provisional:06d}",
                    provisional_date_offset(self.keys, siteid, patient_id, issuer),
                )
        return self._seen[patient_id, issuer]


@dataclass(frozen=True)
class Summary:
    written: int
    refused: Counter[str]
    unreadable: int
    known_patients: int
    provisional_patients: int

    def lines(self) -> list[str]:
        return [
            f"written: {self.written}",
            f"refused: {self.refused.total()}",
            *(f"  {reason}: {count}" for reason, count in sorted(self.refused.items())),
            f"unreadable: {self.unreadable}",
            f"patients known to the index: {self.known_patients}",
            f"patients with a provisional {PROVISIONAL_MARK} pseudonym: "
            f"{self.provisional_patients}",
        ]


def plan(source: Path, target: Path) -> list[tuple[Path, Path]]:
    """(input, output) file pairs: a folder's files, recursively, mirrored under `target`; a
    single file to `target`, or into it when it is a folder."""
    if source.is_file():
        out = target / source.name if target.is_dir() else target
        if out.resolve() == source.resolve():
            raise ToolError("OUT would overwrite IN")
        return [(source, out)]
    if not source.is_dir():
        raise ToolError(f"{source} is neither a file nor a folder")
    resolved = target.resolve()
    if resolved.is_relative_to(source.resolve()):
        raise ToolError("OUT must not be IN or a folder inside it")
    if resolved.is_file():
        raise ToolError(f"{target} is a file; IN is a folder")
    files = sorted(p for p in source.rglob("*") if p.is_file())
    return [(path, target / path.relative_to(source)) for path in files]


async def deidentify_files(
    config: Config, site_name: str, source: Path, target: Path
) -> Summary:
    """De-identify `source` into `target` as the site's ingest would; report to stderr."""
    site_config = config.site_named(site_name)
    pairs = plan(source, target)
    async with open_index(config, create=False) as pool:
        index = Index(pool)
        site = await indexed_site(index, site_name)
        run = DryRun(config, site_config,
                     Pseudonyms(index, site, site_config, Keyring(load_secret(config))))
        bar = tqdm(pairs, desc="de-identifying", unit="file", file=sys.stderr,
                   disable=None if source.is_dir() else True)  # None: on a terminal only
        with bar:
            for path, out in bar:
                await run.file(path, out)
    summary = run.summary()
    for line in summary.lines():
        print(line, file=sys.stderr)
    return summary


class DryRun:
    """Files through parse, admit and prepare, counted; written unless refused or unreadable.
    Each refused or unreadable file is reported by its path and a fixed reason, never a value."""

    def __init__(self, config: Config, site_config: SiteConfig, pseudonyms: Pseudonyms) -> None:
        self.config = config
        self.site_config = site_config
        self.pseudonyms = pseudonyms
        self.written = 0
        self.refused: Counter[str] = Counter()
        self.unreadable = 0

    def summary(self) -> Summary:
        return Summary(self.written, self.refused, self.unreadable, self.pseudonyms.known,
                       self.pseudonyms.provisional)

    def _skip(self, path: Path, why: str) -> None:
        tqdm.write(f"{path}: {why}", file=sys.stderr)

    async def file(self, path: Path, out: Path) -> None:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            self.unreadable += 1
            self._skip(path, f"unreadable: {exc.strerror}")
            return
        limit = self.config.limits.max_object_bytes
        try:
            admitted = admission(raw, limit, self.site_config, True)
            if admitted.refusal is not None:
                raise admitted.refusal
            assert admitted.patient_id is not None
            pseudonym, offset = await self.pseudonyms.of(admitted.patient_id, admitted.issuer)
            context = DeidContext(self.pseudonyms.site.siteid, pseudonym, offset,
                                  self.pseudonyms.keys, self.config.project_name)
            _, data = prepare_object(admitted.dataset or raw, limit, context)
        except RefusedObject as exc:
            self.refused[exc.reason] += 1
            self._skip(path, f"refused ({exc.reason}): {exc.message}")
            return
        except ArchiveError as exc:  # not DICOM, too large, or not processable
            self.unreadable += 1
            self._skip(path, f"unreadable: {exc.message}")
            return
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
        except OSError as exc:
            raise ToolError(f"cannot write {out}: {exc.strerror}") from exc
        self.written += 1
