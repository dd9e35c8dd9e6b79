"""Tests of the DIMSE adapter (ricord_archive/dimse/)."""
