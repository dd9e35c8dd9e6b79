"""`ricord-archive lookup`: the pseudonyms of original patient IDs at a site.

Computed from the secret key (the keyed hash the index stores instead of the ID) and the
index, so a site can link its own records to the archive's patients; nothing is allocated.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ricord_archive.archive import open_index
from ricord_archive.config import Config
from ricord_archive.deid import Keyring
from ricord_archive.index.facade import Index
from ricord_archive.index.store import Patient
from ricord_archive.runtime.secret import load_secret
from ricord_archive.services.patients import find_patients
from ricord_archive.tools import ToolError, indexed_site

PATIENT_ID_COLUMN = "PatientID"
ISSUER_COLUMN = "IssuerOfPatientID"
NOT_FOUND = "not found"


@dataclass(frozen=True)
class Wanted:
    """The patients asked for: (PatientID, IssuerOfPatientID) pairs, and whether the input
    named issuers per patient (a CSV file with an IssuerOfPatientID column)."""

    patients: list[tuple[str, str]]
    issuer_column: bool = False


def read_patients(path: Path) -> Wanted:
    """The PatientID column of a CSV file with a header row ('-': standard input), and its
    IssuerOfPatientID column if it has one."""
    try:
        if str(path) == "-":
            return _patient_columns(sys.stdin)
        with path.open(newline="", encoding="utf-8-sig") as handle:
            return _patient_columns(handle)
    except OSError as exc:
        raise ToolError(f"cannot read {path}: {exc.strerror}") from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise ToolError(f"{path} is not a readable UTF-8 CSV file") from exc


def _patient_columns(handle: TextIO) -> Wanted:
    reader = csv.DictReader(handle)
    columns = reader.fieldnames or ()
    if PATIENT_ID_COLUMN not in columns:
        raise ToolError(f"the CSV file has no {PATIENT_ID_COLUMN} column in its header row")
    issuer_column = ISSUER_COLUMN in columns
    return Wanted([(row[PATIENT_ID_COLUMN] or "", (row[ISSUER_COLUMN] or "") if issuer_column
                    else "") for row in reader], issuer_column)


async def lookup(
    config: Config, site_name: str, patient_ids: list[str], csv_path: Path | None, out: TextIO,
    issuer: str = "",
) -> None:
    """Print the pseudonyms of `patient_ids` (all of `issuer`, "" for none), or of the CSV
    file's PatientID (and IssuerOfPatientID) columns as CSV."""
    if csv_path is not None:
        wanted = read_patients(csv_path)
    else:
        wanted = Wanted([(p, issuer) for p in patient_ids])
    pseudonyms = await pseudonyms_of(config, site_name, wanted.patients)
    if csv_path is None:
        print_plain([p for p, _ in wanted.patients], pseudonyms, out)
    else:
        print_csv(wanted, pseudonyms, out)


async def pseudonyms_of(
    config: Config, site_name: str, patients: list[tuple[str, str]]
) -> list[str | None]:
    """Each (PatientID, IssuerOfPatientID)'s pseudonym at the site, as ingest files it (the
    site's default_issuer for a missing issuer); None when the index does not know the
    patient."""
    site_config = config.site_named(site_name)  # an unknown site fails before any database
    async with open_index(config, create=False) as pool:
        index = Index(pool)
        site = await indexed_site(index, site_name)
        keys = Keyring(load_secret(config))
        # stripped as ingest strips them; an empty ID is never a patient
        stripped = [(p.strip(), i.strip()) for p, i in patients]
        known = await find_patients(index, keys, site, site_config,
                                    [(p, i) for p, i in stripped if p])
    found = iter(known)
    return [_pseudonym(next(found)) if p else None for p, _ in stripped]


def _pseudonym(patient: Patient | None) -> str | None:
    return None if patient is None else patient.pseudonym


def print_plain(patient_ids: list[str], pseudonyms: list[str | None], out: TextIO) -> None:
    """`PATIENT_ID<TAB>pseudonym` lines, 'not found' for unknown patients."""
    for patient_id, pseudonym in zip(patient_ids, pseudonyms, strict=True):
        print(f"{patient_id}\t{pseudonym or NOT_FOUND}", file=out)


def print_csv(wanted: Wanted, pseudonyms: list[str | None], out: TextIO) -> None:
    """A `PatientID[,IssuerOfPatientID],pseudonym` CSV, the pseudonym empty for unknown
    patients."""
    writer = csv.writer(out, lineterminator="\n")
    issuers = [ISSUER_COLUMN] if wanted.issuer_column else []
    writer.writerow([PATIENT_ID_COLUMN, *issuers, "pseudonym"])
    for (patient_id, issuer), pseudonym in zip(wanted.patients, pseudonyms, strict=True):
        writer.writerow([patient_id, *([issuer] if wanted.issuer_column else []),
                         pseudonym or ""])
