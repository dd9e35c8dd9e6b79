"""The archive's DIMSE status codes mean what PS3.4 says (pynetdicom's status tables)."""

from __future__ import annotations

import pytest
from pynetdicom.status import (
    GENERAL_STATUS,
    QR_FIND_SERVICE_CLASS_STATUS,
    QR_GET_SERVICE_CLASS_STATUS,
    QR_MOVE_SERVICE_CLASS_STATUS,
    STORAGE_SERVICE_CLASS_STATUS,
    code_to_category,
)

from ricord_archive.dicom import status as dimse_status

_TABLES = (GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS, QR_FIND_SERVICE_CLASS_STATUS,
           QR_GET_SERVICE_CLASS_STATUS, QR_MOVE_SERVICE_CLASS_STATUS)
_CODES = {name: value for name, value in vars(dimse_status).items()
          if name.isupper() and isinstance(value, int)}
_EXPECTED = {  # name: (category, words of its meaning in one of pynetdicom's tables)
    "SUCCESS": ("Success", ""),
    "PENDING": ("Pending", "continuing"),
    "PENDING_WARNING": ("Pending", "warning"),
    "CANCEL": ("Cancel", ""),
    "MOVE_DESTINATION_UNKNOWN": ("Failure", "move destination unknown"),
    "PROCESSING_FAILURE": ("Failure", "processing failure"),
    "DUPLICATE_SOP_INSTANCE": ("Failure", "duplicat"),
    "SOP_CLASS_NOT_SUPPORTED": ("Failure", "sop class not supported"),
    "NOT_AUTHORIZED": ("Failure", "not authori"),
    "OUT_OF_RESOURCES": ("Failure", "out of resources"),
    "OUT_OF_RESOURCES_MATCHES": ("Failure", "number of matches"),
    "SUB_OPERATIONS_FAILED": ("Failure", "unable to perform sub-operations"),
    "IDENTIFIER_MISMATCH": ("Failure", "does not match sop class"),
    "UNABLE_TO_PROCESS": ("Failure", "understand"),
    "SUB_OPERATIONS_WARNING": ("Warning", "one or more failures"),
    "ELEMENT_DISCARDED": ("Warning", "element discarded"),
}


def test_every_code_is_checked_and_named_once() -> None:
    assert set(_CODES) == set(_EXPECTED)
    assert len(set(_CODES.values())) == len(_CODES)


@pytest.mark.parametrize("name", sorted(_EXPECTED))
def test_each_code_means_what_its_name_says(name: str) -> None:
    category, words = _EXPECTED[name]
    code = _CODES[name]
    meanings = [table[code][1].lower() for table in _TABLES if code in table]
    assert code_to_category(code) == category
    assert any(words in meaning for meaning in meanings), meanings
