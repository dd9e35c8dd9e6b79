"""Application services: they use index/ and blobstore/, and speak domain types."""
