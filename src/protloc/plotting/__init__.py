"""protloc.plotting: matplotlib figures (functions return figures; nothing is shown)."""

from __future__ import annotations

from protloc.plotting.crops import composite, crop_grid

__all__ = ["composite", "crop_grid"]
