"""De-identification on ingest: PS3.15 Annex E, table-driven, recursive and keyed. Pure: no I/O."""

from ricord_archive.deid.engine import deidentify, issuer_of, patient_id_of
from ricord_archive.deid.keys import Keyring, PatientKeys
from ricord_archive.deid.rules import DeidContext

__all__ = ["DeidContext", "Keyring", "PatientKeys", "deidentify", "issuer_of", "patient_id_of"]
