"""protloc.data.world."""
