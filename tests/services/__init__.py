"""Tests of the application services (ricord_archive/services/)."""
