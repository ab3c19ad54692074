"""protloc.nn."""
