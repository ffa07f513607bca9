"""Migration scripts, oldest first (``r<revision>_<slug>.py``)."""
