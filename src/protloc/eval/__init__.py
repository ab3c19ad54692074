"""protloc.eval."""
