"""Tests of the index: SQL on the embedded PostgreSQL (ricord_archive/index/)."""
