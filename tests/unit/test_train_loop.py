"""Tests for protloc.train.loop: metrics log, plateau controller, seeding, accelerator, loaders."""

from __future__ import annotations

import io
import json
import logging
import math
import random

import numpy as np
import pytest
import torch

from protloc.train import loop
from protloc.train.loop import (
    MetricsLogger,
    PlateauController,
    infinite_loader,
    make_accelerator,
    seed_everything,
)


def test_plateau_controller_follows_the_paper_protocol():
    ctl = PlateauController(patience=4, factor=0.1, stop_patience=12)
    assert ctl.update(1.0) == (True, False, False)
    assert ctl.update(0.9) == (True, False, False)
    results = [ctl.update(0.95) for _ in range(12)]
    improved = [r[0] for r in results]
    reduced = [i + 1 for i, r in enumerate(results) if r[1]]
    stopped = [i + 1 for i, r in enumerate(results) if r[2]]
    assert not any(improved)
    # the reduction counter restarts after each reduction: reductions at 4, 8, 12 bad checks, not at
    # every check after the 4th (the reference's bug)
    assert reduced == [4, 8, 12]
    assert stopped == [12]
    assert ctl.lr_scale == pytest.approx(1e-3)
    assert ctl.best == 0.9 and ctl.num_bad == 12


def test_plateau_improvement_resets_both_counters():
    ctl = PlateauController(patience=2, factor=0.5, stop_patience=3)
    seq = [1.0, 1.1, 1.2, 0.8, 0.9, 0.8, 0.85]
    out = [ctl.update(v) for v in seq]
    # 1.1, 1.2: two bad -> reduce; 0.8 improves; 0.9 bad, 0.8 equal (not better), 0.85 bad -> stop at 3
    assert [o[1] for o in out] == [False, False, True, False, False, True, False]
    assert [o[2] for o in out] == [False] * 6 + [True]
    assert ctl.lr_scale == 0.25


def test_plateau_min_delta_and_nan():
    ctl = PlateauController(patience=10, stop_patience=0, min_delta=0.1)
    assert ctl.update(1.0)[0]
    assert not ctl.update(0.95)[0]  # not better by more than min_delta
    assert ctl.update(0.85)[0]
    assert not ctl.update(float("nan"))[0]
    assert not any(ctl.update(5.0)[2] for _ in range(50))  # stop_patience 0: never stops


def test_plateau_state_round_trips_through_weights_only_load():
    ctl = PlateauController()
    for v in (1.0, 2.0, 2.0, 2.0, 2.0, 2.0):
        ctl.update(v)
    buf = io.BytesIO()
    torch.save(ctl.state_dict(), buf)
    buf.seek(0)
    other = PlateauController()
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.state_dict() == ctl.state_dict()
    assert [other.update(2.0) for _ in range(3)] == [ctl.update(2.0) for _ in range(3)]
    fresh = PlateauController()
    fresh.load_state_dict(PlateauController().state_dict())
    assert fresh.best == math.inf


def test_plateau_rejects_bad_settings():
    with pytest.raises(ValueError, match="patience"):
        PlateauController(patience=0)
    with pytest.raises(ValueError, match="factor"):
        PlateauController(factor=1.5)


def test_metrics_logger_writes_flushed_json_lines(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    logger = MetricsLogger(path)
    logger.log(1, "train", {"loss": torch.tensor(2.5), "acc": np.float32(0.5)}, lr=4e-4)
    # flushed: readable before close
    assert json.loads(path.read_text().splitlines()[0]) == {
        "step": 1,
        "split": "train",
        "loss": 2.5,
        "acc": 0.5,
        "lr": 4e-4,
    }
    logger.log(2, "val", {"loss": float("nan")})
    logger.log(3, "train", loss=1.0)
    with pytest.raises(ValueError, match="reserved"):
        logger.log(4, "train", {"split": "val"})
    logger.close()
    records = MetricsLogger.read(path)
    assert [r["step"] for r in records] == [1, 2, 3] and math.isnan(records[1]["loss"])
    # resuming at step 2 drops what came later (and a line cut short by a crash)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"step": 4, "spl')
    with MetricsLogger(path) as again:
        assert again.drop_after(2) == 2
        again.log(3, "train", loss=0.5)
    assert [(r["step"], r["split"]) for r in MetricsLogger.read(path)] == [(1, "train"), (2, "val"), (3, "train")]


def test_seed_everything_is_reproducible():
    seed_everything(11)
    a = (random.random(), np.random.rand(), torch.rand(3))
    seed_everything(11)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[:2] == b[:2] and torch.equal(a[2], b[2])


def test_make_accelerator_cpu_precision(caplog, monkeypatch):
    with caplog.at_level(logging.INFO, logger="protloc.train.loop"):
        acc = make_accelerator("fp16", cpu=True)
    assert acc.device.type == "cpu" and acc.mixed_precision == "no"
    assert "needs a GPU" in caplog.text
    # bf16 on CPU only where the CPU has native bfloat16 instructions.
    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: False)
    assert make_accelerator("bf16", cpu=True).mixed_precision == "no"
    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: True)
    acc = make_accelerator("bf16", cpu=True)
    assert acc.mixed_precision == "bf16"
    with acc.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="mixed_precision"):
        make_accelerator("fp8")


class _EpochLoader:
    """A re-iterable loader whose content depends on the epoch, like a shuffling DataLoader."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.epoch = 0
        self.start = 0
        self.passes = 0

    def set_epoch(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        self.passes += 1
        start, self.start = self.start, 0
        for i in range(start, self.n):
            yield (self.epoch, i)


def test_infinite_loader_runs_fresh_passes():
    loader = _EpochLoader(3)
    it = infinite_loader(loader, loader.set_epoch)
    got = [next(it) for _ in range(7)]
    assert [(e, i) for e, i, _ in got] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    assert all(batch == (e, i) for e, i, batch in got)  # each pass re-iterates, unlike itertools.cycle


def test_infinite_loader_resumes_mid_epoch():
    loader = _EpochLoader(4)
    it = infinite_loader(loader, loader.set_epoch, start_epoch=2, start_batch=3)
    assert [next(it) for _ in range(3)] == [(2, 3, (2, 3)), (3, 0, (3, 0)), (3, 1, (3, 1))]
    # without set_epoch, batches are read and skipped
    it = infinite_loader([10, 11, 12], start_batch=2)
    assert [next(it) for _ in range(3)] == [(0, 2, 12), (1, 0, 10), (1, 1, 11)]


def test_infinite_loader_refuses_an_empty_loader():
    with pytest.raises(RuntimeError, match="no batch"):
        next(infinite_loader([]))


# ---- data-parallel helpers (one process here; tests/reliability/test_distributed.py runs two) ----------


def _acc(world: int = 1, rank: int = 0):
    from types import SimpleNamespace

    return SimpleNamespace(num_processes=world, process_index=rank)


def test_mean_over_processes_divides_sums_by_counts() -> None:
    from protloc.train.loop import mean_over_processes

    assert mean_over_processes(_acc(), {"loss": 6.0, "acc": 1.5}, 3) == {"loss": 2.0, "acc": 0.5}
    assert mean_over_processes(_acc(), {"loss": 6.0, "loss_text": 1.0}, {"loss": 3, "loss_text": 2}) == {
        "loss": 2.0,
        "loss_text": 0.5,
    }


def test_seed_process_gives_other_ranks_their_own_reproducible_stream() -> None:
    from protloc.train.loop import seed_everything, seed_process

    def draw(rank: int) -> torch.Tensor:
        seed_everything(7)
        seed_process(7, rank)
        return torch.rand(4)

    assert torch.equal(draw(0), (seed_everything(7), torch.rand(4))[1])  # rank 0: the run's own stream
    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(0)) and not torch.equal(draw(1), draw(2))


def test_restore_process_rng_takes_this_process_state_or_reseeds() -> None:
    from protloc.models.checkpoint import capture_rng_state
    from protloc.train.loop import process_rng_states, restore_process_rng, seed_everything

    seed_everything(3)
    saved = process_rng_states(_acc())
    assert set(saved) == {"rng", "rng_ranks"} and len(saved["rng_ranks"]) == 1
    expected = torch.rand(3)
    torch.rand(10)  # move on
    restore_process_rng(saved, _acc(), seed=3, step=5)
    assert torch.equal(torch.rand(3), expected)
    # a state of another number of processes: process 0 restores the first state, process 1 reseeds
    two = {"rng": saved["rng"], "rng_ranks": [saved["rng"], capture_rng_state(), capture_rng_state()]}
    restore_process_rng(two, _acc(2, 1), seed=3, step=5)
    assert not torch.equal(torch.rand(3), expected)
