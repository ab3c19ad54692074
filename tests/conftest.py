"""Fixtures for every test.

Tests run single-threaded: their tiny models gain nothing from intra-op threads, and on a busy 2-core
machine OpenMP threads waiting on each other made training steps 10x slower or worse. ``celle_inputs``
is a tiny CELL-E store with untrained tokenizers (smoke and reliability tests train on it).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from protloc.data.io import CropStore
from protloc.data.sequences import write_fasta
from protloc.models.checkpoint import save_checkpoint
from protloc.models.vqgan import VQGAN, VQGANConfig


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def write_tiny_esm2() -> Callable[[Path], torch.nn.Module]:
    """Write a 1-layer, 32-wide ESM-2 as a fair-esm checkpoint file; returns the writer (skips without fair-esm)."""
    esm = pytest.importorskip("esm")

    def write(path: Path) -> torch.nn.Module:
        torch.manual_seed(0)
        model = esm.ESM2(num_layers=1, embed_dim=32, attention_heads=2, alphabet="ESM-1b", token_dropout=True).eval()
        cfg = argparse.Namespace(encoder_layers=1, encoder_embed_dim=32, encoder_attention_heads=2, token_dropout=True)
        state = {f"encoder.sentence_encoder.{k}": v for k, v in model.state_dict().items()}
        torch.save({"cfg": {"model": cfg}, "model": state}, path)
        return model

    return write


#: Image side and residue window of the shared tiny CELL-E.
CELLE_S = 32
CELLE_MAX_RESIDUES = 16
CELLE_SEQUENCES = {"P0": "MKTAYIAKQRQ", "P1": "PKKKRKV" * 3, "P2": "ACDEFGHIKLMNPQ"}


def _write_celle_store(
    path: Path,
    *,
    n_train: int = 8,
    n_val: int = 4,
    chunk: int = 4,
    centres: tuple[float, float] = (10, 22),
    sequences: dict[str, str] | None = None,
) -> Path:
    """A CELL-E store of ``CELLE_S`` px crops of proteins P0-P2 (a Gaussian nucleus, a protein brighter
    on it, its threshold image) and ``sequences.fasta`` beside it."""
    rng = np.random.default_rng(0)
    n = n_train + n_val
    yy, xx = np.mgrid[:CELLE_S, :CELLE_S]
    c = rng.uniform(*centres, size=(n, 2))
    nucleus = np.exp(-((yy - c[:, :1, None]) ** 2 + (xx - c[:, 1:, None]) ** 2) / 40.0)
    protein = np.clip(rng.random((n, CELLE_S, CELLE_S)) * (0.3 + 0.7 * nucleus), 0, 1)
    threshold = (protein >= protein.mean(axis=(1, 2), keepdims=True)).astype(np.uint8)
    obs = pd.DataFrame({"protein_id": [f"P{i % 3}" for i in range(n)], "split": ["train"] * n_train + ["val"] * n_val})
    channels = {"nucleus": "float16", "protein": "float16", "threshold": "uint8"}
    with CropStore.create(path, channels=channels, size=CELLE_S, chunk=chunk) as writer:
        writer.append({"nucleus": nucleus, "protein": protein, "threshold": threshold}, obs)
    write_fasta(path.parent / "sequences.fasta", CELLE_SEQUENCES if sequences is None else sequences)
    return path


def _write_celle_tokenizer(path: Path, kind: str, seed: int) -> Path:
    """An untrained ``tiny`` VQGAN tokenizer for ``CELLE_S`` px images (4 x 4 tokens, 128 codes)."""
    torch.manual_seed(seed)
    cfg = VQGANConfig.tiny().replace(image_size=CELLE_S)
    save_checkpoint(path, model=VQGAN(cfg), config=cfg, extra={"kind": kind, "step": 0})
    return path


@pytest.fixture(scope="session")
def celle_builders() -> SimpleNamespace:
    """``.store(path, **options)`` and ``.tokenizer(path, kind, seed)``: the writers behind ``celle_inputs``."""
    return SimpleNamespace(store=_write_celle_store, tokenizer=_write_celle_tokenizer)


@pytest.fixture(scope="session")
def celle_inputs(tmp_path_factory) -> dict[str, Path]:
    """A tiny CELL-E store (``CELLE_S`` px, 12 crops of 3 proteins) and untrained tiny tokenizers."""
    root = tmp_path_factory.mktemp("celle_inputs")
    return {
        "store": _write_celle_store(root / "celle.zarr"),
        "nucleus": _write_celle_tokenizer(root / "vq_n", "nucleus", 0),
        "threshold": _write_celle_tokenizer(root / "vq_t", "threshold", 1),
    }
