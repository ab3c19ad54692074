from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from protloc.config import apply_overrides, config_from_dict, config_to_dict, load_config, save_config
from protloc.errors import ConfigError


@dataclass(frozen=True)
class Optim:
    lr: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass(frozen=True)
class Run:
    steps: int = 10
    name: str = "run"
    amp: bool = False
    ckpt: str | None = None
    optim: Optim = field(default_factory=Optim)


def test_overrides_coerce_types():
    cfg = apply_overrides(Run(), ["optim.lr=1e-3", "steps=5", "amp=true", "ckpt=none", "optim.betas=[0.5,0.9]"])
    assert cfg == Run(steps=5, amp=True, ckpt=None, optim=Optim(lr=1e-3, betas=(0.5, 0.9)))
    assert isinstance(cfg.optim.betas, tuple)


def test_unknown_key_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rate'"):
        apply_overrides(Run(), ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match=r"did you mean 'steps'"):
        apply_overrides(Run(), ["stpes=3"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(Run(), ["steps"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match="steps"):
        apply_overrides(Run(), ["steps=abc"])
    with pytest.raises(ConfigError, match="amp"):
        config_from_dict(Run, {"amp": "maybe"})


def test_yaml_round_trip(tmp_path):
    cfg = Run(steps=7, optim=Optim(lr=0.1))
    p = save_config(cfg, tmp_path / "c.yaml")
    assert load_config(Run, path=p) == cfg
    assert config_to_dict(cfg)["optim"]["betas"] == [0.9, 0.999]
    # file then overrides, overrides win
    assert load_config(Run, path=p, overrides=["steps=1"]).steps == 1


def test_yaml_unknown_key_names_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*optim\.lrr"):
        load_config(Run, path=p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(Run, path=tmp_path / "missing.yaml")


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    import os
    import stat

    from protloc._fs import atomic_dir, atomic_write_text

    umask = os.umask(0o022)
    os.umask(umask)
    p = atomic_write_text(tmp_path / "a.txt", "x")
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask
    with atomic_dir(tmp_path / "d") as d:
        (d / "f").write_text("y")
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~umask
