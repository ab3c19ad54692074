"""The shipped weights: present, small, strictly loadable, self-describing and tamper-evident."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from protloc.config import load_config
from protloc.errors import InputError
from protloc.eval.load import load_celle_run, load_cytoself, load_tokenizer
from protloc.pretrained import PRETRAINED, list_pretrained, pretrained_path, read_recipe, resolve_checkpoint
from protloc.train.celle import TrainCelleConfig
from protloc.train.cytoself import TrainCytoselfConfig
from protloc.train.vqgan import TrainVQGANConfig


def test_all_shipped_models_are_present_and_small() -> None:
    rows = list_pretrained()
    assert [r["name"] for r in rows] == list(PRETRAINED)
    assert all(r["available"] for r in rows)
    total = sum(r["megabytes"] for r in rows)
    assert 1.0 < total < 20.0, total  # "a few MB in all" (float16 storage, cytoself-small without its ID heads)


def test_resolve_checkpoint() -> None:
    assert resolve_checkpoint(None, default="celle-tiny") == pretrained_path("celle-tiny")
    assert resolve_checkpoint("pretrained:cytoself-tiny") == pretrained_path("cytoself-tiny")
    assert resolve_checkpoint("runs/x") == Path("runs/x")
    with pytest.raises(InputError, match="no shipped model called 'celle-huge'.*celle-tiny"):
        resolve_checkpoint("pretrained:celle-huge")
    with pytest.raises(InputError, match="no checkpoint given"):
        resolve_checkpoint(None)


def test_shipped_models_load_strictly_into_float32() -> None:
    cyto = load_cytoself(pretrained_path("cytoself-tiny"))
    assert all(p.dtype == torch.float32 for p in cyto.parameters())
    stored = load_file(str(pretrained_path("cytoself-tiny") / "model.safetensors"))
    assert {t.dtype for t in stored.values() if t.is_floating_point()} == {torch.float16}
    # the default cytoself ships without its protein-ID heads (they only name the training proteins)
    small = load_cytoself(pretrained_path("cytoself-small"))
    assert small.config.global_dim == 288 and not small.config.use_fc and small.fc1 is None
    assert read_recipe("cytoself-small")["training_config"]["model"]["use_fc"] is True
    assert (
        len(json.loads((pretrained_path("cytoself-small") / "config.json").read_text())["extra"]["training_proteins"])
        > 300
    )
    enc = small.encode(torch.rand(2, 2, 100, 100))
    assert enc.q2.shape == (2, 288, 4, 4) and enc.idx1.shape == (2, 1, 25, 25)
    for kind in ("nucleus", "threshold"):
        vq, _, _ = load_tokenizer(pretrained_path(f"vqgan-{kind}-tiny"), kind)
        assert vq.config.image_size == 64
    run = load_celle_run(pretrained_path("celle-tiny"))
    # the tokenizers are found beside the model through relative paths, checked by SHA-256
    assert run.nucleus is not None and run.threshold is not None
    assert run.model.config.max_residues == 300 and run.image_size == 64


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("cytoself-small", TrainCytoselfConfig),
        ("cytoself-tiny", TrainCytoselfConfig),
        ("vqgan-nucleus-tiny", TrainVQGANConfig),
        ("vqgan-threshold-tiny", TrainVQGANConfig),
        ("celle-tiny", TrainCelleConfig),
        ("celle2-tiny-masked", TrainCelleConfig),
        ("celle-tiny-onehot", TrainCelleConfig),
        ("celle-tiny-noseq", TrainCelleConfig),
    ],
)
def test_recipes_record_a_loadable_training_config(name: str, cls: type, tmp_path: Path) -> None:
    recipe = read_recipe(name)
    for key in ("command", "training_config", "trained_on", "validation", "fidelity_vs_float32", "steps"):
        assert recipe.get(key), key
    assert recipe["command"].startswith("protloc train ")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe["training_config"]))
    cfg = load_config(cls, path=path)  # `protloc demo --train` trains from exactly this
    assert cfg.schedule.max_steps >= recipe["steps"]
    fid = recipe["fidelity_vs_float32"]
    agree = [v for k, v in fid.items() if k.startswith("same_")]
    assert agree and min(agree) > 0.99, fid


def test_changed_tokenizer_weights_are_refused(tmp_path: Path) -> None:
    for name in ("celle-tiny", "vqgan-nucleus-tiny", "vqgan-threshold-tiny"):
        shutil.copytree(pretrained_path(name), tmp_path / name)
    weights = tmp_path / "vqgan-nucleus-tiny" / "model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k, t in tensors.items() if t.is_floating_point())
    tensors[key] = tensors[key] + 1e-2
    save_file(tensors, str(weights))
    with pytest.raises(InputError, match="nucleus tokenizer's weights changed"):
        load_celle_run(tmp_path / "celle-tiny")
    meta = json.loads((tmp_path / "celle-tiny" / "config.json").read_text())
    assert meta["extra"]["tokenizers"]["nucleus"] == "../vqgan-nucleus-tiny"
