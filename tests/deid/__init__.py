"""Tests of de-identification and the acceptance policy (ricord_archive/deid/)."""
