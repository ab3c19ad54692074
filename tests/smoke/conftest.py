"""Shared smoke-test fixtures.

``celle_run_dir`` is a tiny trained CELL-E shared by the prediction and screen tests, trained on the
root conftest's ``celle_inputs`` (every test runs single-threaded: ``tests/conftest.py``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from protloc.train.celle import TrainCelleConfig, train_celle


@pytest.fixture(scope="session")
def celle_run_dir(tmp_path_factory, celle_inputs) -> Path:
    """A CELL-E trained for 2 steps on a tiny store with untrained tiny tokenizers."""
    root = tmp_path_factory.mktemp("celle_run")
    base = TrainCelleConfig.tiny(
        str(celle_inputs["store"]), nucleus=str(celle_inputs["nucleus"]), threshold=str(celle_inputs["threshold"])
    )
    cfg = dataclasses.replace(
        base,
        model=base.model.replace(grid_size=4, max_residues=16),
        data=dataclasses.replace(base.data, image_size=32, crop_size=0, batch_size=4, chunk_window=2),
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
