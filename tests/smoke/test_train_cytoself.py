"""Smoke tests of `train_cytoself`: a tiny store, a few steps, resume, checkpoints, configs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from protloc.config import load_config
from protloc.data.io import CropStore
from protloc.errors import ConfigError, InputError
from protloc.models.checkpoint import load_checkpoint, load_trainer_state
from protloc.models.cytoself import Cytoself, CytoselfConfig
from protloc.train.cytoself import TrainCytoselfConfig, train_cytoself
from protloc.train.loop import MetricsLogger, warmup_cosine

ROOT = Path(__file__).resolve().parents[2]
S = 32  # the tiny model at 32 px keeps each step around 0.1 s on a laptop CPU


def _make_store(path: Path, *, splits: tuple[str, ...] = ("train", "train", "train", "val")) -> Path:
    """3 proteins x 40 crops; fields of 10 crops assigned to splits in turn."""
    rng = np.random.default_rng(0)
    n = 120
    fov = np.arange(n) // 10
    obs = pd.DataFrame(
        {
            "protein_id": [f"P{f % 3}" for f in fov],
            "fov_id": [f"f{f}" for f in fov],
            "split": [splits[f % len(splits)] for f in fov],
        }
    )
    protein = rng.random((n, S, S)).astype(np.float32)
    with CropStore.create(
        path, channels={"protein": "float16", "nucleus": "float16", "nucleus_distance": "float16"}, size=S, chunk=16
    ) as writer:
        writer.append({"protein": protein, "nucleus": protein, "nucleus_distance": 2 * protein - 1}, obs)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return _make_store(tmp_path_factory.mktemp("store") / "cytoself.zarr")


def _config(store: Path, *, max_steps: int, **schedule) -> TrainCytoselfConfig:
    base = TrainCytoselfConfig.tiny(store=str(store))
    return dataclasses.replace(
        base,
        model=base.model.replace(input_size=S),
        data=dataclasses.replace(base.data, batch_size=8, chunk_window=2),
        schedule=dataclasses.replace(base.schedule, max_steps=max_steps, eval_every=2, log_every=1, **schedule),
        save_every=0,
    )


def test_train_resume_and_checkpoints(store, tmp_path):
    run = tmp_path / "run"
    summary = train_cytoself(_config(store, max_steps=2), run_dir=run, progress=False)
    assert summary["steps"] == 2 and summary["best_step"] == 2 and not summary["stopped_early"]
    assert summary["images_per_s"] > 0
    assert sorted(p.name for p in run.iterdir()) == ["best", "config.yaml", "label_map.json", "last", "metrics.jsonl"]
    assert json.loads((run / "label_map.json").read_text()) == {"P0": 0, "P1": 1, "P2": 2}
    saved = load_config(TrainCytoselfConfig, path=run / "config.yaml")
    assert saved.model.num_classes == 3 and saved.schedule.max_steps == 2

    # a finished run is not overwritten by accident
    with pytest.raises(InputError, match="already holds a run"):
        train_cytoself(_config(store, max_steps=2), run_dir=run, progress=False)

    changed = _config(store, max_steps=4)
    changed = dataclasses.replace(changed, model=changed.model.replace(commitment_cost=0.5))
    with pytest.raises(ConfigError, match="different model: model.commitment_cost changed"):
        train_cytoself(changed, run_dir=run, resume=True, progress=False)

    summary = train_cytoself(_config(store, max_steps=4), run_dir=run, resume=True, progress=False)
    assert summary["steps"] == 4 and summary["steps_this_run"] == 2
    state = load_trainer_state(run / "last")
    assert state["step"] == 4 and state["batch_in_epoch"] == 4 and state["epoch"] == 0
    records = MetricsLogger.read(run / "metrics.jsonl")
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in val] == [2, 4]
    for key in ("loss", "recon1", "recon2", "vq1", "vq2", "fc1", "fc2", "perplexity1", "perplexity2", "acc1", "acc2"):
        assert np.isfinite(val[-1][key]), key

    for name in ("best", "last"):
        model, config, extra = load_checkpoint(run / name, model_cls=Cytoself, config_cls=CytoselfConfig, strict=True)
        assert config.num_classes == 3 and config.input_size == S
        assert extra["label_map"] == {"P0": 0, "P1": 1, "P2": 2}
        assert model.encode(torch.rand(2, 2, S, S)).q2.shape[0] == 2

    # resuming is the same as never stopping: identical weights after 4 steps
    straight = tmp_path / "straight"
    train_cytoself(_config(store, max_steps=4), run_dir=straight, progress=False)
    a = load_file(str(run / "last" / "model.safetensors"))
    b = load_file(str(straight / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_plateau_schedule_stops_early(store, tmp_path):
    # a min_delta no loss can beat: every check after the first counts as "no improvement"
    cfg = _config(store, max_steps=40, plateau_patience=1, stop_patience=2, min_delta=1e9)
    summary = train_cytoself(dataclasses.replace(cfg, save_every=0), run_dir=tmp_path / "run", progress=False)
    assert summary["stopped_early"] and summary["steps"] == 6  # checks at 2 (first = best), 4, 6
    val = [r for r in MetricsLogger.read(tmp_path / "run" / "metrics.jsonl") if r["split"] == "val"]
    assert [r["lr"] for r in val] == pytest.approx([4e-4, 4e-5, 4e-6])


def test_bad_inputs_are_explained(store, tmp_path):
    no_val = _make_store(tmp_path / "noval.zarr", splits=("train",))
    with pytest.raises(InputError, match=r"no 'val' rows.*re-run `protloc prepare` with a split"):
        train_cytoself(_config(no_val, max_steps=1), run_dir=tmp_path / "a", progress=False)
    cfg = _config(store, max_steps=1)
    with pytest.raises(ConfigError, match="data.store is not set"):
        train_cytoself(
            dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, store="")),
            run_dir=tmp_path / "b",
            progress=False,
        )
    with pytest.raises(ConfigError, match=r"data.channels \['protein'\] differ from model.channels"):
        train_cytoself(
            dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, channels=("protein",))),
            run_dir=tmp_path / "c",
            progress=False,
        )
    with pytest.raises(InputError, match="crops are 32x32 pixels but model.input_size is 100"):
        train_cytoself(
            dataclasses.replace(cfg, model=cfg.model.replace(input_size=100)), run_dir=tmp_path / "d", progress=False
        )
    with pytest.raises(InputError, match="nothing to resume"):
        train_cytoself(cfg, run_dir=tmp_path / "e", resume=True, progress=False)


@pytest.mark.parametrize("name", ["tiny", "small", "paper"])
def test_shipped_configs_match_presets(name):
    cfg = load_config(TrainCytoselfConfig, path=ROOT / "configs" / "cytoself" / f"{name}.yaml")
    assert cfg == getattr(TrainCytoselfConfig, name)()


def test_cosine_schedule_with_warmup_resumes_exactly(store, tmp_path):
    cfg = _config(store, max_steps=6, lr_decay="cosine", warmup_steps=2, min_lr_ratio=0.1)
    run = tmp_path / "run"
    train_cytoself(
        dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, max_steps=6)), run_dir=run, progress=False
    )
    lrs = [r["lr"] for r in MetricsLogger.read(run / "metrics.jsonl") if r["split"] == "train"]
    expected = [warmup_cosine(s, 4e-4, warmup_steps=2, max_steps=6, min_ratio=0.1) for s in range(1, 7)]
    assert lrs == pytest.approx(expected)
    assert lrs[0] == pytest.approx(2e-4) and lrs[1] == pytest.approx(4e-4) and lrs[-1] == pytest.approx(4e-5)
    with pytest.raises(ConfigError, match="max_steps"):
        dataclasses.replace(cfg.schedule, max_steps=0)
    # killed at step 5 (last/ holds step 4) and resumed: the same curve and the same weights
    from protloc.train.engine import Run

    step_done = Run.step_done

    def crash(self, *args, **kwargs):
        step_done(self, *args, **kwargs)
        if self.step == 5:
            raise RuntimeError("simulated crash")

    part = tmp_path / "part"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Run, "step_done", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train_cytoself(cfg, run_dir=part, progress=False)
    assert load_trainer_state(part / "last")["step"] == 4
    train_cytoself(cfg, run_dir=part, resume=True, progress=False)
    resumed = [r["lr"] for r in MetricsLogger.read(part / "metrics.jsonl") if r["split"] == "train" and r["step"] > 4]
    assert resumed == pytest.approx(expected[4:])
    a = load_file(str(run / "last" / "model.safetensors"))
    b = load_file(str(part / "last" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_autocast_on_cpu(store, tmp_path, monkeypatch):
    from protloc.train import loop

    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: True)
    cfg = dataclasses.replace(_config(store, max_steps=2), mixed_precision="bf16")
    summary = train_cytoself(cfg, run_dir=tmp_path / "run", progress=False)
    assert summary["steps"] == 2
    val = [r for r in MetricsLogger.read(tmp_path / "run" / "metrics.jsonl") if r["split"] == "val"]
    assert np.isfinite(val[-1]["loss"])
    # the weights stay float32 (autocast computes in bf16, the optimizer updates float32 masters)
    state = load_file(str(tmp_path / "run" / "last" / "model.safetensors"))
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}


def test_uniform_batches_from_memory_resume_exactly(store, tmp_path):
    def cfg(steps: int) -> TrainCytoselfConfig:
        c = _config(store, max_steps=steps)
        return dataclasses.replace(c, data=dataclasses.replace(c.data, shuffle="random", in_memory=True))

    train_cytoself(cfg(4), run_dir=tmp_path / "straight", progress=False)
    train_cytoself(cfg(2), run_dir=tmp_path / "part", progress=False)
    train_cytoself(cfg(4), run_dir=tmp_path / "part", resume=True, progress=False)
    a = load_file(str(tmp_path / "straight" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "last" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
