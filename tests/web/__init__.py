"""Tests of the HTTP adapter (ricord_archive/web/)."""
