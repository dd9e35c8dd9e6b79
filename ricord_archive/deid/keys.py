"""Keyed hashing: every derived identifier comes from an HMAC of the original under the secret key.

The same input always gives the same output, after a restart and on any node that shares the
key, and nothing derived here can be reversed without the key.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

_SEPARATOR = b"\x00"


@dataclass(frozen=True)
class PatientKeys:
    """The keyed hashes a patient is found by: `key`, what it is filed under, and `legacy`, the
    hash of (site, PatientID) alone that a patient allocated before issuers counted holds (None
    when `key` is that hash already: the object names no issuer)."""

    key: bytes
    legacy: bytes | None


class Keyring:
    """Derives purpose-separated keyed digests from one secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the secret key must be at least 16 bytes")
        self._secret = secret

    def digest(self, purpose: str, *parts: str) -> bytes:
        message = _SEPARATOR.join(p.encode("utf-8") for p in (purpose, *parts))
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def patient_key(self, siteid: str, patient_id: str, issuer: str = "") -> bytes:
        """What the index stores for a patient instead of the original PatientID and its
        IssuerOfPatientID; without an issuer, the hash of (site, PatientID) as it always was."""
        if not issuer:
            return self.digest("patient", siteid, patient_id)
        return self.digest("patient-issuer", siteid, issuer, patient_id)

    def patient_keys(self, siteid: str, patient_id: str, issuer: str = "") -> PatientKeys:
        """The patient's key and, when it names an issuer, the issuer-less key it may claim."""
        key = self.patient_key(siteid, patient_id, issuer)
        return PatientKeys(key, self.patient_key(siteid, patient_id) if issuer else None)

    def uid(self, siteid: str, original: str) -> str:
        """A `2.25.<integer>` UID (at most 44 characters) standing for `original` at this site."""
        number = int.from_bytes(self.digest("uid", siteid, original)[:16], "big")
        return f"2.25.{number}"

    def short_code(self, purpose: str, siteid: str, original: str, length: int = 16) -> str:
        """An upper-case hexadecimal code of `length` characters, e.g. for AccessionNumber."""
        return self.digest(purpose, siteid, original).hex()[:length].upper()
