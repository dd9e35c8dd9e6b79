"""Tests of the process and operations plumbing (ricord_archive/runtime/)."""
