"""The DIMSE adapter (pynetdicom)."""
