"""Smoke tests of `train_vqgan`: a tiny CELL-E-like store, a few steps with the GAN on, resume, checkpoints."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from protloc.config import load_config
from protloc.data.datasets import VQGANCrops
from protloc.data.io import CropStore
from protloc.data.preprocess import threshold_mean
from protloc.errors import ConfigError, InputError
from protloc.models.checkpoint import load_checkpoint, load_trainer_state
from protloc.models.vqgan import VQGAN, VQGANConfig
from protloc.train.loop import MetricsLogger
from protloc.train.vqgan import TrainVQGANConfig, train_vqgan

ROOT = Path(__file__).resolve().parents[2]
S = 64
N_TRAIN, N_VAL = 16, 8


def _make_store(path: Path, *, channels: tuple[str, ...] = ("nucleus", "protein", "threshold")) -> Path:
    """24 crops: a bright disc (nucleus) and speckles (protein) in [0, 1], the mean threshold as uint8."""
    rng = np.random.default_rng(0)
    n = N_TRAIN + N_VAL
    yy, xx = np.mgrid[:S, :S]
    centres = rng.uniform(16, 48, size=(n, 2))
    nucleus = np.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) / 200.0)
    protein = rng.random((n, S, S)) * (0.3 + 0.7 * nucleus)
    arrays = {
        "nucleus": nucleus.astype(np.float32),
        "protein": protein.astype(np.float32),
        "threshold": threshold_mean(protein).astype(np.uint8),
    }
    dtypes = {"nucleus": "float16", "protein": "float16", "threshold": "uint8"}
    obs = pd.DataFrame({"protein_id": [f"P{i % 3}" for i in range(n)], "split": ["train"] * N_TRAIN + ["val"] * N_VAL})
    with CropStore.create(path, channels={c: dtypes[c] for c in channels}, size=S, chunk=8) as writer:
        writer.append({c: arrays[c] for c in channels}, obs)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return _make_store(tmp_path_factory.mktemp("store") / "celle.zarr")


def _config(store: Path, kind: str, *, max_steps: int, image_size: int = S, restart_every: int = 2) -> TrainVQGANConfig:
    base = TrainVQGANConfig.tiny(store=str(store), kind=kind)
    return dataclasses.replace(
        base,
        model=base.model.replace(image_size=image_size),
        data=dataclasses.replace(base.data, image_size=image_size, batch_size=4, chunk_window=2),
        loss=dataclasses.replace(base.loss, disc_start=1),  # the GAN path runs from the second step
        codebook=dataclasses.replace(base.codebook, restart_every=restart_every),  # restarts after steps 2, 4, ...
        schedule=dataclasses.replace(base.schedule, max_steps=max_steps, eval_every=2, log_every=1),
        save_every=0,
    )


@torch.no_grad()
def _val_mse(model: VQGAN, store: Path, kind: str, image_size: int) -> float:
    ds = VQGANCrops(store, split="val", kind=kind, image_size=image_size)
    x = ds.read_batch(np.arange(len(ds)))["image"]
    return float(F.mse_loss(model(x).reconstruction, x))


@pytest.mark.parametrize(("kind", "image_size"), [("nucleus", 32), ("threshold", 32)])
def test_train_resume_and_checkpoints(store, tmp_path, kind, image_size):
    run = tmp_path / "run"
    summary = train_vqgan(_config(store, kind, max_steps=3, image_size=image_size), run_dir=run, progress=False)
    assert summary["steps"] == 3 and summary["images_per_s"] > 0
    assert sorted(p.name for p in run.iterdir()) == ["best", "config.yaml", "last", "metrics.jsonl"]
    assert load_config(TrainVQGANConfig, path=run / "config.yaml").kind == kind

    records = MetricsLogger.read(run / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert [r["gan"] for r in train] == [False, True, True]
    assert "d_loss" not in train[0] and all(math.isfinite(r[k]) for r in train[1:] for k in ("d_loss", "d_weight"))
    restarted = [r["codes_restarted"] for r in train]
    assert restarted[0] == restarted[2] == 0 and restarted[1] > 0  # dead codes restarted after step 2
    assert summary["codes_restarted"] == restarted[1]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in val] == [2, 3]
    for r in val:
        assert all(math.isfinite(r[k]) for k in ("rec_mse", "rec_l1", "vq_loss", "perplexity"))
        assert r["dead_codes"] + r["codes_used"] == 128
        assert r["rec_loss"] == pytest.approx(4 * r["rec_mse"], rel=1e-4)  # MSE in the model's [-1, 1] units
        if kind == "threshold":
            assert 0 <= r["pixel_accuracy"] <= 1 and 0 <= r["nucleus_proportion_accuracy"] <= 1
        else:
            assert "pixel_accuracy" not in r

    with pytest.raises(InputError, match="already holds a run"):
        train_vqgan(_config(store, kind, max_steps=3, image_size=image_size), run_dir=run, progress=False)
    other = "threshold" if kind == "nucleus" else "nucleus"
    with pytest.raises(ConfigError, match=f"it trains the '{kind}' tokenizer"):
        train_vqgan(_config(store, other, max_steps=4, image_size=image_size), run_dir=run, resume=True, progress=False)

    summary = train_vqgan(
        _config(store, kind, max_steps=4, image_size=image_size), run_dir=run, resume=True, progress=False
    )
    assert summary["steps"] == 4 and summary["steps_this_run"] == 1
    state = load_trainer_state(run / "last")
    assert state["step"] == 4 and state["batch_in_epoch"] == 4 and set(state) >= {"opt_ae", "opt_disc", "discriminator"}

    # both checkpoints load strictly; best/ reproduces the validation error it was saved with
    for name in ("best", "last"):
        model, config, extra = load_checkpoint(run / name, model_cls=VQGAN, config_cls=VQGANConfig, strict=True)
        assert config.image_size == image_size and extra["kind"] == kind
        if name == "best":
            assert extra["step"] == summary["best_step"]
            assert _val_mse(model, store, kind, image_size) == pytest.approx(extra["val"]["rec_mse"], rel=1e-5)
        else:
            assert extra["step"] == 4

    if kind == "threshold":
        # resuming is the same as never stopping: identical autoencoder and discriminator after 4 steps
        # (with codebook restarts after steps 2 and 4; the usage counted at step 3 is in trainer_state)
        straight = tmp_path / "straight"
        whole = train_vqgan(_config(store, kind, max_steps=4, image_size=image_size), run_dir=straight, progress=False)
        assert whole["codes_restarted"] == summary["codes_restarted"] == state["codes_restarted"]
        assert summary["codes_restarted"] > restarted[1]  # the resumed step 4 restarted codes too
        a = load_file(str(run / "last" / "model.safetensors"))
        b = load_file(str(straight / "last" / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        da = state["discriminator"]
        db = load_trainer_state(straight / "last")["discriminator"]
        assert all(torch.equal(da[k], db[k]) for k in da)


def test_codebook_restarts_leave_fewer_dead_codes(store, tmp_path):
    runs = {}
    for every in (0, 2):
        cfg = _config(store, "nucleus", max_steps=4, image_size=32, restart_every=every)
        runs[every] = train_vqgan(cfg, run_dir=tmp_path / f"restart{every}", progress=False)
    off, on = runs[0], runs[2]
    assert off["codes_restarted"] == 0 and on["codes_restarted"] > 0
    assert "codes_restarted" not in MetricsLogger.read(tmp_path / "restart0" / "metrics.jsonl")[0]
    assert on["last_val"]["dead_codes"] < off["last_val"]["dead_codes"]
    assert math.isfinite(on["last_val"]["rec_mse"])


def test_crops_resize_threshold_and_flips(store):
    plain = VQGANCrops(store, split="train", kind="threshold", image_size=32, with_nucleus=True)
    batch = plain.read_batch([0, 1, 2, 3])
    raw = CropStore.open(store).read([0, 1, 2, 3], channels=["protein", "nucleus"])
    protein = F.interpolate(torch.from_numpy(raw["protein"].astype(np.float32))[:, None], size=(32, 32), mode="area")
    assert batch["image"].shape == (4, 1, 32, 32) and set(batch["image"].unique().tolist()) == {0.0, 1.0}
    assert torch.equal(batch["image"], (protein >= protein.mean(dim=(-2, -1), keepdim=True)).float())
    assert batch["nucleus"].shape == (4, 1, 32, 32)

    # at the store's size the stored threshold channel is used as is
    full = VQGANCrops(store, split="train", kind="threshold", image_size=S).read_batch([0])["image"]
    stored = torch.from_numpy(CropStore.open(store).read(0, channels=["threshold"])["threshold"].astype(np.float32))
    assert torch.equal(full[0, 0], stored)

    flipped = VQGANCrops(store, split="train", kind="threshold", image_size=32, augment=True, with_nucleus=True)
    idx = list(range(N_TRAIN))
    first = flipped.read_batch(idx)
    assert torch.equal(first["image"], flipped.read_batch(idx)["image"])  # reproducible within an epoch
    ref = plain.read_batch(idx)
    kinds = set()
    for i in idx:
        options = [ref["image"][i], ref["image"][i].flip(-1), ref["image"][i].flip(-2), ref["image"][i].flip(-1, -2)]
        match = [k for k, o in enumerate(options) if torch.equal(first["image"][i], o)]
        assert match, i
        # the nucleus crop is flipped like the image
        n_options = [ref["nucleus"][i], ref["nucleus"][i].flip(-1), ref["nucleus"][i].flip(-2)]
        n_options.append(ref["nucleus"][i].flip(-1, -2))
        assert any(torch.equal(first["nucleus"][i], n_options[k]) for k in match)
        kinds.add(match[0])
    assert len(kinds) > 1
    flipped.set_epoch(1)
    assert not torch.equal(first["image"], flipped.read_batch(idx)["image"])


def test_bad_inputs_are_explained(store, tmp_path):
    cfg = _config(store, "threshold", max_steps=1)
    with pytest.raises(ConfigError, match="data.store is not set"):
        train_vqgan(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, store="")), run_dir=tmp_path / "a")
    nucleus_only = _make_store(tmp_path / "nuc.zarr", channels=("nucleus",))
    with pytest.raises(InputError, match=r"lacks channel\(s\) \['protein', 'threshold'\] for the threshold tokenizer"):
        train_vqgan(_config(nucleus_only, "threshold", max_steps=1), run_dir=tmp_path / "b", progress=False)
    with pytest.raises(InputError, match="data.image_size 128 is larger than the store's 64x64 crops"):
        train_vqgan(_config(store, "nucleus", max_steps=1, image_size=128), run_dir=tmp_path / "c", progress=False)
    with pytest.raises(ConfigError, match=r"data.image_size \(32\) differs from model.image_size \(64\)"):
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=32))
    lpips = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, perceptual_weights=str(tmp_path / "no.pt")))
    with pytest.raises(ConfigError, match="loss.perceptual_weights: no such file"):
        train_vqgan(lpips, run_dir=tmp_path / "d", progress=False)
    with pytest.raises(InputError, match="nothing to resume"):
        train_vqgan(cfg, run_dir=tmp_path / "e", resume=True, progress=False)


def test_vq_weightings():
    from protloc.nn.quantize import VQOutput
    from protloc.train.vqgan import VQGANLossConfig, _vq_loss

    one = torch.tensor(1.0)
    vq = VQOutput(one, one, torch.tensor(2.0 + 0.25 * 3.0), torch.tensor(2.0), torch.tensor(3.0), one, one)
    assert float(_vq_loss("vqvae", vq, 0.25)) == 2.0 + 0.25 * 3.0  # codebook + beta commitment (VQ-VAE)
    assert float(_vq_loss("taming", vq, 0.25)) == 0.25 * 2.0 + 3.0  # taming's legacy weighting
    with pytest.raises(ConfigError, match="loss.vq_weighting must be 'vqvae' or 'taming'"):
        VQGANLossConfig(vq_weighting="both")


@pytest.mark.parametrize("name", ["tiny", "paper"])
def test_shipped_configs_match_presets(name):
    cfg = load_config(TrainVQGANConfig, path=ROOT / "configs" / "vqgan" / f"{name}.yaml")
    assert cfg == getattr(TrainVQGANConfig, name)()


def test_codebook_config():
    from protloc.config import apply_overrides
    from protloc.train.vqgan import VQGANCodebookConfig

    assert not TrainVQGANConfig.paper().codebook.enabled  # not in the paper: off
    assert TrainVQGANConfig.tiny().codebook.enabled
    cfg = VQGANCodebookConfig(restart_every=50, restart_until=120)
    assert [s for s in range(1, 301) if cfg.restarts_at(s)] == [50, 100]
    assert not any(VQGANCodebookConfig().restarts_at(s) for s in range(1, 10))
    tiny = apply_overrides(TrainVQGANConfig.tiny(), ["codebook.restart_every=0", "codebook.restart_noise=0.1"])
    assert tiny.codebook == VQGANCodebookConfig(restart_every=0, restart_noise=0.1)
    with pytest.raises(ConfigError, match="codebook.restart_min_usage must be >= 1"):
        VQGANCodebookConfig(restart_min_usage=0)
    with pytest.raises(ConfigError, match="codebook.restart_every must be >= 0"):
        VQGANCodebookConfig(restart_every=-1)
    with pytest.raises(ConfigError, match="codebook.restart_noise must be >= 0"):
        VQGANCodebookConfig(restart_noise=-0.5)
    with pytest.raises(ConfigError, match="restart_evry"):
        apply_overrides(TrainVQGANConfig.tiny(), ["codebook.restart_evry=3"])
