"""Shared smoke-test fixtures.

``celle_run_dir`` is a tiny trained CELL-E shared by the prediction and screen tests (every test runs
single-threaded: ``tests/conftest.py``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from protloc.data.io import CropStore
from protloc.data.sequences import write_fasta
from protloc.models.vqgan import VQGAN, VQGANConfig
from protloc.train.celle import TrainCelleConfig, train_celle
from protloc.train.checkpoint import save_checkpoint

#: Image side and residue window of the shared tiny CELL-E.
CELLE_S = 32
CELLE_MAX_RESIDUES = 16


def _make_celle_store(path: Path) -> Path:
    rng = np.random.default_rng(0)
    n = 12
    yy, xx = np.mgrid[:CELLE_S, :CELLE_S]
    centres = rng.uniform(10, 22, size=(n, 2))
    nucleus = np.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) / 40.0)
    protein = np.clip(rng.random((n, CELLE_S, CELLE_S)) * (0.3 + 0.7 * nucleus), 0, 1)
    threshold = (protein >= protein.mean(axis=(1, 2), keepdims=True)).astype(np.uint8)
    obs = pd.DataFrame({"protein_id": [f"P{i % 3}" for i in range(n)], "split": ["train"] * 8 + ["val"] * 4})
    channels = {"nucleus": "float16", "protein": "float16", "threshold": "uint8"}
    with CropStore.create(path, channels=channels, size=CELLE_S, chunk=4) as writer:
        writer.append({"nucleus": nucleus, "protein": protein, "threshold": threshold}, obs)
    write_fasta(path.parent / "sequences.fasta", {"P0": "MKTAYIAKQRQ", "P1": "PKKKRKV" * 3, "P2": "ACDEFGHIKLMNPQ"})
    return path


def _celle_tokenizer(path: Path, kind: str, seed: int) -> Path:
    torch.manual_seed(seed)
    cfg = VQGANConfig.tiny().replace(image_size=CELLE_S)  # 4 x 4 tokens, 128 codes
    save_checkpoint(path, model=VQGAN(cfg), config=cfg, extra={"kind": kind, "step": 0})
    return path


@pytest.fixture(scope="session")
def celle_inputs(tmp_path_factory) -> dict[str, Path]:
    """A tiny CELL-E store (``CELLE_S`` px, 12 crops of 3 proteins) and untrained tiny tokenizers."""
    root = tmp_path_factory.mktemp("celle_inputs")
    return {
        "store": _make_celle_store(root / "celle.zarr"),
        "nucleus": _celle_tokenizer(root / "vq_n", "nucleus", 0),
        "threshold": _celle_tokenizer(root / "vq_t", "threshold", 1),
    }


@pytest.fixture(scope="session")
def celle_run_dir(tmp_path_factory, celle_inputs) -> Path:
    """A CELL-E trained for 2 steps on a tiny store with untrained tiny tokenizers."""
    root = tmp_path_factory.mktemp("celle_run")
    base = TrainCelleConfig.tiny(
        str(celle_inputs["store"]), nucleus=str(celle_inputs["nucleus"]), threshold=str(celle_inputs["threshold"])
    )
    cfg = dataclasses.replace(
        base,
        model=base.model.replace(grid_size=4, max_residues=CELLE_MAX_RESIDUES),
        data=dataclasses.replace(base.data, image_size=CELLE_S, crop_size=0, batch_size=4, chunk_window=2),
        optim=dataclasses.replace(base.optim, warmup_steps=1),
        schedule=dataclasses.replace(base.schedule, max_steps=2, eval_every=2, log_every=1, eval_batches=1),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # session fixtures run before conftest's per-test single-thread fixture
    try:
        train_celle(cfg, run_dir=root / "celle", progress=False)
    finally:
        torch.set_num_threads(threads)
    return root / "celle"
