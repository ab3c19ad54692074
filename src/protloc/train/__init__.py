"""protloc.train."""
