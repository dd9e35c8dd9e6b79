"""Expert labels on the archive's images: the labelling schema, annotations, consensus,
MD.ai import and export, and DICOM SEG / SR built from them (issue #15)."""
