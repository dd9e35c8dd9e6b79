"""Pure DICOM encoding and representation: no I/O beyond the bytes given."""
