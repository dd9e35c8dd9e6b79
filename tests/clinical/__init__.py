"""Tests of clinical data (ricord_archive/clinical/)."""
