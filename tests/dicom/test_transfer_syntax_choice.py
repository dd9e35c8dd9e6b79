"""The one transfer-syntax choice of WADO-RS, C-GET and C-MOVE."""

from __future__ import annotations

from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
)

from ricord_archive.dicom.pixels import STORED, choose_transfer_syntax


def test_the_stored_syntax_when_acceptable() -> None:
    assert choose_transfer_syntax(JPEG2000Lossless, [ExplicitVRLittleEndian,
                                                     JPEG2000Lossless]) == JPEG2000Lossless
    assert choose_transfer_syntax(JPEG2000Lossless, [STORED]) == JPEG2000Lossless
    assert choose_transfer_syntax(ImplicitVRLittleEndian,
                                  {ImplicitVRLittleEndian}) == ImplicitVRLittleEndian


def test_a_client_order_counts() -> None:
    """An ordered list (a client's Accept): the first uncompressed syntax in it."""
    accept = [JPEGBaseline8Bit, ImplicitVRLittleEndian, ExplicitVRLittleEndian]
    assert choose_transfer_syntax(JPEG2000Lossless, accept) == ImplicitVRLittleEndian


def test_without_an_order_the_archive_prefers_explicit() -> None:
    """A set (the contexts a DIMSE peer accepted) has no order: Explicit VR first."""
    accepted = {ImplicitVRLittleEndian, ExplicitVRLittleEndian}
    assert choose_transfer_syntax(JPEG2000Lossless, accepted) == ExplicitVRLittleEndian
    assert choose_transfer_syntax(JPEG2000Lossless,
                                  {ImplicitVRLittleEndian}) == ImplicitVRLittleEndian


def test_none_when_nothing_acceptable_can_be_produced() -> None:
    assert choose_transfer_syntax(JPEG2000Lossless, [JPEGBaseline8Bit, ExplicitVRBigEndian]) is None
    assert choose_transfer_syntax(ExplicitVRLittleEndian, set()) is None
