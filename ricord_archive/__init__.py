"""ricord-archive: a de-identifying DICOMweb and DIMSE research imaging archive."""

__version__ = "0.1.0"
