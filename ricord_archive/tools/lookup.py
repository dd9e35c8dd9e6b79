"""`ricord-archive lookup`: the pseudonyms of original patient IDs at a site.

Computed from the secret key (the keyed hash the index stores instead of the ID) and the
index, so a site can link its own records to the archive's patients; nothing is allocated.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import TextIO

from ricord_archive.archive import open_index
from ricord_archive.config import Config
from ricord_archive.deid import Keyring
from ricord_archive.index.reads import patients_by_key
from ricord_archive.secret import load_secret
from ricord_archive.tools import ToolError, indexed_site

PATIENT_ID_COLUMN = "PatientID"
NOT_FOUND = "not found"


def read_patient_ids(path: Path) -> list[str]:
    """The PatientID column of a CSV file with a header row ('-': standard input)."""
    try:
        if str(path) == "-":
            return _patient_id_column(sys.stdin)
        with path.open(newline="", encoding="utf-8-sig") as handle:
            return _patient_id_column(handle)
    except OSError as exc:
        raise ToolError(f"cannot read {path}: {exc.strerror}") from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise ToolError(f"{path} is not a readable UTF-8 CSV file") from exc


def _patient_id_column(handle: TextIO) -> list[str]:
    reader = csv.DictReader(handle)
    if PATIENT_ID_COLUMN not in (reader.fieldnames or ()):
        raise ToolError(f"the CSV file has no {PATIENT_ID_COLUMN} column in its header row")
    return [row[PATIENT_ID_COLUMN] or "" for row in reader]


async def lookup(
    config: Config, site_name: str, patient_ids: list[str], csv_path: Path | None, out: TextIO
) -> None:
    """Print the pseudonyms of `patient_ids`, or of the CSV file's PatientID column as CSV."""
    if csv_path is not None:
        patient_ids = read_patient_ids(csv_path)
    pseudonyms = await pseudonyms_of(config, site_name, patient_ids)
    (print_plain if csv_path is None else print_csv)(patient_ids, pseudonyms, out)


async def pseudonyms_of(
    config: Config, site_name: str, patient_ids: list[str]
) -> list[str | None]:
    """Each ID's pseudonym at the site, None when the index does not know the patient."""
    config.site_named(site_name)  # an unknown site fails before any database is started
    async with open_index(config, create=False) as pool:
        site = await indexed_site(pool, site_name)
        keys = Keyring(load_secret(config))
        # stripped as ingest strips PatientID; an empty ID is never a patient
        wanted = [keys.patient_key(site.siteid, p.strip()) if p.strip() else None
                  for p in patient_ids]
        known = await patients_by_key(pool, site, [k for k in wanted if k is not None])
    return [known[k].pseudonym if k in known else None for k in wanted]


def print_plain(patient_ids: list[str], pseudonyms: list[str | None], out: TextIO) -> None:
    """`PATIENT_ID<TAB>pseudonym` lines, 'not found' for unknown patients."""
    for patient_id, pseudonym in zip(patient_ids, pseudonyms, strict=True):
        print(f"{patient_id}\t{pseudonym or NOT_FOUND}", file=out)


def print_csv(patient_ids: list[str], pseudonyms: list[str | None], out: TextIO) -> None:
    """A `PatientID,pseudonym` CSV, the pseudonym empty for unknown patients."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([PATIENT_ID_COLUMN, "pseudonym"])
    writer.writerows(zip(patient_ids, (p or "" for p in pseudonyms), strict=True))
