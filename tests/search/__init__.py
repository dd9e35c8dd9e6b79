"""Tests of the query model and its parsers (ricord_archive/search/)."""
