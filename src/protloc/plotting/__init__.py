"""protloc.plotting."""
