"""protloc.models."""
