"""Tests for protloc.models.checkpoint: safetensors checkpoints, strict loads, atomic saves."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from protloc.errors import InputError
from protloc.models.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    load_model_weights,
    load_trainer_state,
    restore_rng_state,
    save_checkpoint,
)
from protloc.models.cytoself import Cytoself, CytoselfConfig


@dataclass(frozen=True)
class ToyConfig:
    width: int = 4
    tied: bool = False


class Toy(nn.Module):
    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.a = nn.Linear(3, config.width)
        self.norm = nn.BatchNorm1d(config.width)
        self.b = nn.Linear(config.width, config.width)
        if config.tied:
            self.c = self.b  # a tied module: two state-dict keys share storage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.norm(self.a(x)))


class OtherToy(Toy):
    pass


def _tiny_cytoself(seed: int = 0) -> Cytoself:
    torch.manual_seed(seed)
    return Cytoself(CytoselfConfig.tiny(num_classes=3).replace(input_size=32))


def test_round_trip_gives_identical_outputs(tmp_path):
    model = _tiny_cytoself()
    model.train()
    model.loss({"image": torch.rand(4, 2, 32, 32), "label": torch.tensor([0, 1, 2, 0])})  # move BN stats
    model.eval()
    save_checkpoint(
        tmp_path / "ck", model=model, config=model.config, trainer_state=None, extra={"label_map": {"A": 0}}
    )
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert meta["model_type"] == "Cytoself" and meta["num_classes"] == 3 and "protloc_version" in meta
    loaded, config, extra = load_checkpoint(tmp_path / "ck", model_cls=Cytoself, config_cls=CytoselfConfig)
    assert config == model.config and extra == {"label_map": {"A": 0}}
    assert not loaded.training
    x = torch.rand(3, 2, 32, 32)
    a, b = model.encode(x), loaded.encode(x)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    assert torch.equal(model(x).reconstruction, loaded(x).reconstruction)


def test_wrapper_prefixes_are_stripped(tmp_path):
    model = Toy(ToyConfig())
    save_checkpoint(tmp_path / "ck", model=nn.DataParallel(model), config=model.config)
    keys = set(load_file(str(tmp_path / "ck" / "model.safetensors")))
    assert keys == set(model.state_dict())
    # a file written by someone else through torch.compile + DDP wrappers still loads
    state = {f"module._orig_mod.{k}": v.clone() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "ck" / "model.safetensors"))
    fresh = load_model_weights(tmp_path / "ck", Toy(ToyConfig()))
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_tied_weights_save_and_load_strictly(tmp_path):
    model = Toy(ToyConfig(tied=True))
    save_checkpoint(tmp_path / "ck", model=model, config=model.config)
    loaded, _, _ = load_checkpoint(tmp_path / "ck", model_cls=Toy, config_cls=ToyConfig)
    assert torch.equal(loaded.c.weight, model.b.weight)


def test_strict_load_names_checkpoint_and_keys(tmp_path):
    ck = tmp_path / "ck"
    save_checkpoint(ck, model=Toy(ToyConfig()), config=ToyConfig())
    where = re.escape(str(ck))
    with pytest.raises(InputError, match=where + r".*missing keys c\.weight, c\.bias"):
        load_model_weights(ck, Toy(ToyConfig(tied=True)))
    state = load_file(str(ck / "model.safetensors"))
    save_file({**state, "extra.weight": torch.zeros(2)}, str(ck / "model.safetensors"))
    with pytest.raises(InputError, match=where + r".*unexpected keys extra\.weight"):
        load_checkpoint(ck, model_cls=Toy, config_cls=ToyConfig)
    # non-strict tolerates it, with a warning
    load_model_weights(ck, Toy(ToyConfig()), strict=False)
    with pytest.raises(InputError, match=r"shape mismatch for a\.weight \(checkpoint \[4, 3\], model \[5, 3\]\)"):
        load_model_weights(ck, Toy(ToyConfig(width=5)), strict=False)
    with pytest.raises(InputError, match="holds a 'Toy' model, not a 'OtherToy'"):
        load_checkpoint(ck, model_cls=OtherToy, config_cls=ToyConfig)
    with pytest.raises(InputError, match="checkpoint folder not found"):
        load_checkpoint(tmp_path / "nope", model_cls=Toy, config_cls=ToyConfig)
    (ck / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_checkpoint(ck, model_cls=Toy, config_cls=ToyConfig)


def test_trainer_state_loads_weights_only_and_restores_rng(tmp_path):
    model = Toy(ToyConfig())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(5, 3)).sum().backward()
    opt.step()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_checkpoint(
        tmp_path / "ck", model=model, config=model.config, trainer_state={"optimizer": opt.state_dict(), "step": 7}
    )
    expected = (random.random(), np.random.rand(), torch.rand(1))
    state = load_trainer_state(tmp_path / "ck")
    assert state["step"] == 7 and set(state) == {"optimizer", "step", "rng"}
    fresh = torch.optim.Adam(Toy(ToyConfig()).parameters(), lr=1e-3)
    fresh.load_state_dict(state["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    restore_rng_state(state["rng"])
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])
    save_checkpoint(tmp_path / "inference", model=model, config=model.config)
    with pytest.raises(InputError, match="trainer_state.pt is missing"):
        load_trainer_state(tmp_path / "inference")


def test_rng_capture_round_trip():
    state = capture_rng_state()
    draws = (random.random(), np.random.rand(), torch.rand(2))
    restore_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    ck = tmp_path / "last"
    first = Toy(ToyConfig())
    save_checkpoint(ck, model=first, config=first.config, trainer_state={"step": 1})
    second = Toy(ToyConfig())

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(ck, model=second, config=second.config, trainer_state={"step": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no temporary leftovers
    assert load_trainer_state(ck)["step"] == 1
    loaded, _, _ = load_checkpoint(ck, model_cls=Toy, config_cls=ToyConfig)
    assert torch.equal(loaded.a.weight, first.a.weight)
    # a successful save replaces it
    save_checkpoint(ck, model=second, config=second.config, trainer_state={"step": 2})
    assert load_trainer_state(ck)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_extra_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path / "ck", model=Toy(ToyConfig()), config=ToyConfig(), extra={"x": object()})
    assert not (tmp_path / "ck").exists()
