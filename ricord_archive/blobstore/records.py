"""Allocation records: what the index allocates that no stored object holds (a site's SITEID, a
patient's keyed identity, pseudonym and date offset), also kept beside the blobs, so that
`ricord-archive rebuild-index` can restore the index from the blob store alone. Pure."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import orjson


@dataclass(frozen=True)
class SiteRecord:
    name: str
    siteid: str

    @property
    def record_name(self) -> str:
        return f"sites/{self.siteid}.json"

    def encode(self) -> bytes:
        return orjson.dumps({"name": self.name, "siteid": self.siteid})

    @staticmethod
    def decode(data: bytes) -> SiteRecord:
        value = orjson.loads(data)
        return SiteRecord(str(value["name"]), str(value["siteid"]))


@dataclass(frozen=True)
class PatientRecord:
    """A patient as allocated at a site, with the keyed hashes (HMAC) it is filed under, never
    an original value: `patient_key` of (site, PatientID), `issuer_key` of (site,
    IssuerOfPatientID, PatientID) (`deid.keys.PatientKeys`; either may be None).

    A record that holds an issuer key has its own name, so a record written from an older
    reading of the row (without it) never replaces it; `merged` joins a patient's records."""

    siteid: str
    pseudonym: str
    patient_key: bytes | None
    date_offset_days: int
    issuer_key: bytes | None = None

    @property
    def record_name(self) -> str:
        suffix = "" if self.issuer_key is None else ".issuer"
        return f"patients/{self.pseudonym}{suffix}.json"

    def encode(self) -> bytes:
        value = {"siteid": self.siteid, "pseudonym": self.pseudonym,
                 "patient_key": _hex(self.patient_key),
                 "date_offset_days": self.date_offset_days}
        if self.issuer_key is not None:  # records without one stay as they always were
            value["issuer_key"] = self.issuer_key.hex()
        return orjson.dumps(value)

    @staticmethod
    def decode(data: bytes) -> PatientRecord:
        value = orjson.loads(data)
        return PatientRecord(str(value["siteid"]), str(value["pseudonym"]),
                             _bytes(value.get("patient_key")), int(value["date_offset_days"]),
                             _bytes(value.get("issuer_key")))

    @staticmethod
    def merged(records: Iterable[PatientRecord]) -> list[PatientRecord]:
        """One record per pseudonym, holding every key any of its records holds (a patient's
        keys are only ever added, never changed)."""
        joined: dict[str, PatientRecord] = {}
        for record in records:
            seen = joined.get(record.pseudonym)
            joined[record.pseudonym] = record if seen is None else replace(
                seen, patient_key=seen.patient_key or record.patient_key,
                issuer_key=seen.issuer_key or record.issuer_key)
        return list(joined.values())


def _hex(key: bytes | None) -> str | None:
    return None if key is None else key.hex()


def _bytes(text: str | None) -> bytes | None:
    return None if text is None else bytes.fromhex(text)
