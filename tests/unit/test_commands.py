"""protloc.commands: one module per command; the API and the command line run the same functions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

import protloc.api as pla
from protloc._fs import OUTPUT_MARKER, check_out, release_outputs
from protloc.commands import atlas, embed, inputs, interpret, spectrum
from protloc.commands.train import train_config
from protloc.data.preprocess import nucleus_to_model, reference_nucleus, threshold_to_model
from protloc.errors import ConfigError, InputError
from protloc.eval.predict import SamplingConfig, sampling_config


def test_the_api_re_exports_the_computing_functions_of_the_commands() -> None:
    assert pla.atlas is atlas.atlas
    assert pla.spectra is spectrum.spectra
    assert pla.feature_zeroing is interpret.feature_zeroing
    assert pla.embed is embed.embed
    assert pla.load_celle is inputs.load_celle and pla.load_cytoself is inputs.load_cytoself


def test_check_out_refuses_only_a_non_empty_output(tmp_path: Path) -> None:
    assert check_out(tmp_path / "new", overwrite=False) == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty", overwrite=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(InputError, match="not empty.*--overwrite"):
        check_out(tmp_path / "full", overwrite=False)
    with pytest.raises(InputError, match="only folders protloc wrote"):  # a folder of the user's
        check_out(tmp_path / "full", overwrite=True)
    (tmp_path / "full" / OUTPUT_MARKER).write_text("{}")
    check_out(tmp_path / "full", overwrite=True)  # protloc's own output
    release_outputs()
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="already exists"):
        check_out(tmp_path / "file", overwrite=False)


def test_sampling_config_takes_its_fields_as_keywords() -> None:
    assert sampling_config() == SamplingConfig()
    assert sampling_config(samples=2, seed=3) == SamplingConfig(samples=2, seed=3)
    assert sampling_config(SamplingConfig(temperature=0.5), seed=1) == SamplingConfig(temperature=0.5, seed=1)
    with pytest.raises(TypeError, match="sampling_seed"):
        sampling_config(sampling_seed=1)
    with pytest.raises(ConfigError):
        sampling_config(samples=0)


def test_train_config_is_built_once_for_the_command_line_and_the_api(tmp_path: Path) -> None:
    overrides = ["schedule.max_steps=7", "data.store=b.zarr"]
    cfg = train_config("vqgan", out=tmp_path / "run", store="a.zarr", kind="threshold", overrides=overrides)
    assert cfg.kind == "threshold" and cfg.schedule.max_steps == 7
    assert str(cfg.data.store) == "a.zarr"  # the named option wins over an override of the same key
    # resuming without --config: the run's own config.yaml, then what is given now
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"schedule": {"max_steps": 11, "eval_every": 5}}))
    resumed = train_config("vqgan", out=run, resume=True, overrides=["schedule.eval_every=3"])
    assert resumed.schedule.max_steps == 11 and resumed.schedule.eval_every == 3
    assert train_config("vqgan", out=run).schedule.max_steps != 11  # not resuming: the preset
    with pytest.raises(ConfigError, match="model must be"):
        train_config("resnet", out=run)
    with pytest.raises(ConfigError, match="preset"):
        train_config("celle", out=run, preset="huge")


def test_nucleus_and_threshold_images_become_model_inputs() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((40, 50)) * 1000
    nuc, info = nucleus_to_model(image, 16, source="test")
    assert nuc.shape == (16, 16) and nuc.dtype == np.float32 and 0.0 <= nuc.min() and nuc.max() <= 1.0
    assert info == {"input_shape": [40, 50], "crop": {"y": 0, "x": 5, "side": 40}}
    with pytest.raises(InputError, match="constant"):
        nucleus_to_model(np.ones((20, 20)), 16, source="test")
    with pytest.raises(InputError, match="at least 16 x 16"):
        nucleus_to_model(image[:10], 16, source="test")
    thr = np.zeros((32, 32))
    thr[8:24, 8:24] = 255
    binary = threshold_to_model(thr, 16, source="test")
    assert set(np.unique(binary)) == {0.0, 1.0} and binary[8, 8] == 1.0 and binary[0, 0] == 0.0
    with pytest.raises(InputError, match="negative"):
        threshold_to_model(-thr, 16, source="test")
    ref, ref_info = reference_nucleus(32, 256)
    assert ref.shape == (32, 32) and ref.max() > 0 and ref_info["field_px"] == 256
