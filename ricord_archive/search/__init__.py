"""The pure query model and its QIDO-RS parser."""
