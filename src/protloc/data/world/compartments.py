"""The compartments of the reference cell world.

Twelve subcellular compartments, in a fixed order used by every asset, truth table and evaluation.
They follow the coarse classes of the OpenCell / cytoself annotations (nucleoplasm, nucleolus, nuclear
membrane, chromatin, cytoplasm, mitochondria, ER, Golgi, vesicles, membrane, cytoskeleton, centrosome).
"""

from __future__ import annotations

COMPARTMENTS: tuple[str, ...] = (
    "nucleoplasm",
    "nucleolus",
    "nuclear_envelope",
    "chromatin",
    "cytosol",
    "mitochondria",
    "er",
    "golgi",
    "vesicles",
    "plasma_membrane",
    "cytoskeleton",
    "centrosome",
)

#: Compartments that lie inside the nucleus (used for nucleus proportion truths).
NUCLEAR: frozenset[str] = frozenset({"nucleoplasm", "nucleolus", "chromatin"})

#: Column names of the compartments' weights in asset and truth tables (``w_<name>``).
WEIGHT_COLUMNS: tuple[str, ...] = tuple(f"w_{c}" for c in COMPARTMENTS)
