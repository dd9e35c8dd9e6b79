"""Tests of expert labels (ricord_archive/labels/)."""
