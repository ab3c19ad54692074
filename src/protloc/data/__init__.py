"""protloc.data."""
