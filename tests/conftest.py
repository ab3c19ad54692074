"""Fixtures for every test.

Tests run single-threaded: their tiny models gain nothing from intra-op threads, and on a busy 2-core
machine OpenMP threads waiting on each other made training steps 10x slower or worse.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest
import torch


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
