"""A stored instance as the services and adapters see it: where its bytes are and what a
retrieval needs to know about them without reading them. Pure (the index fills it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StoredInstance:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    blob_key: str
    size_bytes: int
    pixel_data_offset: int | None
    pixel_data_length: int | None
    number_of_frames: int
    rows: int | None
    columns: int | None
    samples_per_pixel: int | None
    bits_allocated: int | None
