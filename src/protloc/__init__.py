"""protloc: predict and profile where proteins live inside human cells.

Implements cytoself (self-supervised localization embeddings from fluorescence crops) and CELL-E
(sequence + nucleus image -> 2D localization probability map).
"""

from __future__ import annotations

__version__ = "0.1.0"

from protloc.errors import ConfigError, InputError, ProtlocError

__all__ = ["ConfigError", "InputError", "ProtlocError", "__version__"]
