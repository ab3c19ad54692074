"""protloc.analysis."""
