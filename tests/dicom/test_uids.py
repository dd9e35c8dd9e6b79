"""The one UID check for input."""

from __future__ import annotations

import pytest

from ricord_archive.dicom.uids import is_uid


@pytest.mark.parametrize("text", ["1", "1.2.840.10008.1.2.1", "2.25.0", "1.02.3",
                                  "1." + "2" * 62])
def test_digits_and_dots_up_to_64_are_uids(text: str) -> None:
    assert is_uid(text)


@pytest.mark.parametrize("text", ["", ".", "1.", ".1", "1..2", "1.2a", " 1.2", "1.2\n", "1,2",
                                  "1." + "2" * 63, "\u0661.\u0662"])  # Arabic-Indic digits
def test_anything_else_is_not(text: str) -> None:
    assert not is_uid(text)
