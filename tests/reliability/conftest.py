"""Fixtures of the reliability tests."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from protloc.data.io import CropStore

#: Crop side of ``cytoself_store``.
CYTOSELF_S = 32


@pytest.fixture()
def cytoself_store(tmp_path: Path) -> Path:
    """A 120-crop, 32 px cytoself store: 12 fields of view of 3 proteins, 9 for training and 3 for validation."""
    path = tmp_path / "cytoself.zarr"
    rng = np.random.default_rng(0)
    n = 120
    fov = np.arange(n) // 10
    obs = pd.DataFrame(
        {
            "protein_id": [f"P{f % 3}" for f in fov],
            "fov_id": [f"f{f}" for f in fov],
            "split": [("train", "train", "train", "val")[f % 4] for f in fov],
        }
    )
    protein = rng.random((n, CYTOSELF_S, CYTOSELF_S)).astype(np.float32)
    chans = {"protein": "float16", "nucleus": "float16", "nucleus_distance": "float16"}
    with CropStore.create(path, channels=chans, size=CYTOSELF_S, chunk=16) as w:
        w.append({"protein": protein, "nucleus": protein, "nucleus_distance": 2 * protein - 1}, obs)
    return path


def _digest(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, by relative name (outputs, checkpoints, inputs)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture()
def digest() -> Callable[[Path], dict[str, str]]:
    """What the reliability tests compare before and after a refused command (:func:`_digest`)."""
    return _digest
