"""Allocation records: what the index allocates that no stored object holds (a site's SITEID, a
patient's keyed identity, pseudonym and date offset), also kept beside the blobs, so that
`ricord-archive rebuild-index` can restore the index from the blob store alone. Pure."""

from __future__ import annotations

from dataclasses import dataclass

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
    """A patient as allocated at a site: `patient_key` is the keyed hash (HMAC) of the original
    Patient ID, never the ID itself."""

    siteid: str
    pseudonym: str
    patient_key: bytes
    date_offset_days: int

    @property
    def record_name(self) -> str:
        return f"patients/{self.pseudonym}.json"

    def encode(self) -> bytes:
        return orjson.dumps({"siteid": self.siteid, "pseudonym": self.pseudonym,
                             "patient_key": self.patient_key.hex(),
                             "date_offset_days": self.date_offset_days})

    @staticmethod
    def decode(data: bytes) -> PatientRecord:
        value = orjson.loads(data)
        return PatientRecord(str(value["siteid"]), str(value["pseudonym"]),
                             bytes.fromhex(value["patient_key"]), int(value["date_offset_days"]))
