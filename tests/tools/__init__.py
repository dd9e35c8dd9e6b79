"""Tests of the offline tools (ricord_archive/tools/)."""
