"""Fixtures for every test.

Tests run single-threaded: their tiny models gain nothing from intra-op threads, and on a busy 2-core
machine OpenMP threads waiting on each other made training steps 10x slower or worse.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
