"""Tests of the pure DICOM encoding and representation (ricord_archive/dicom/)."""
