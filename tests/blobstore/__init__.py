"""Tests of the blob stores (ricord_archive/blobstore/)."""
