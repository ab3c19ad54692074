"""Finite or refuse: non-finite numbers are never saved, loaded or reported silently.

- a checkpoint with a NaN / Inf tensor is refused by every loader (``protloc embed``, ``protloc predict``,
  its tokenizers too), in one line naming the folder, the tensor and how many values are non-finite;
- weights that are not finite are never saved (``save_checkpoint``);
- training whose loss turns NaN (``--set optim.lr=1e12``) stops with ``TrainingDiverged``, exit status 2
  and one line naming the step and the terms; the previous ``last/`` and ``best/`` stay byte-identical,
  load, and the run resumes from them with a lower learning rate; with two processes both stop;
- encodings (embed) and token probabilities (predict) that come out non-finite are refused, naming the
  crops / sequences, and nothing is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

import protloc
from protloc.cli import main
from protloc.data.io import CropStore
from protloc.errors import InputError, NonFiniteError, TrainingDiverged
from protloc.eval.load import load_cytoself
from protloc.models.checkpoint import MODEL_FILE, load_checkpoint, save_checkpoint
from protloc.models.cytoself import Cytoself, CytoselfConfig

WEIGHTS = Path(protloc.__file__).parent / "weights"
S = 32  # the crop side of the cytoself_store fixture (conftest.py)
CYTO_ARGS = ["--set", f"model.input_size={S}", "--set", "data.batch_size=8", "--set", "data.chunk_window=2"]
CYTO_ARGS += ["--set", "schedule.eval_every=2", "--set", "schedule.log_every=1"]


def _poison(folder: Path, key: str | None = None, *, value: float = float("nan"), count: int = 1) -> str:
    """Set ``count`` values of one tensor of ``folder/model.safetensors`` to ``value``; return its name."""
    tensors = load_file(folder / MODEL_FILE)
    key = key or next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() >= count)
    tensors[key].view(-1)[:count] = value
    save_file(tensors, str(folder / MODEL_FILE), metadata={"format": "pt"})
    return key


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("protloc: error: "), err
    return err


def _store(path: Path, n: int = 6, size: int = 100) -> Path:
    """A small cytoself store at the shipped cytoself-tiny's crop size."""
    rng = np.random.default_rng(0)
    obs = pd.DataFrame({"protein_id": [f"P{i % 2}" for i in range(n)], "split": ["test"] * n})
    x = rng.random((n, size, size)).astype(np.float32)
    with CropStore.create(path, channels={"protein": "float16", "nucleus_distance": "float16"}, size=size) as w:
        w.append({"protein": x, "nucleus_distance": 2 * x - 1}, obs)
    return path


# --------------------------------------------------------------------------------------------------
# loading and saving checkpoints
# --------------------------------------------------------------------------------------------------


def test_loading_a_checkpoint_with_a_nan_tensor_names_it(tmp_path: Path) -> None:
    bad = tmp_path / "cytoself-nan"
    shutil.copytree(WEIGHTS / "cytoself-tiny", bad)
    key = _poison(bad, count=3)
    with pytest.raises(InputError) as info:
        load_cytoself(bad)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(bad))
    assert f"{key} (3 of " in msg and "1 tensor(s) hold NaN or Inf" in msg
    # an infinite value is refused as well
    inf = tmp_path / "cytoself-inf"
    shutil.copytree(WEIGHTS / "cytoself-tiny", inf)
    key = _poison(inf, value=float("-inf"))
    with pytest.raises(InputError, match=f"{key} \\(1 of "):
        load_checkpoint(inf, model_cls=Cytoself, config_cls=CytoselfConfig)
    # the shipped weights themselves load
    assert load_cytoself(WEIGHTS / "cytoself-tiny").config.input_size == 100


def test_the_accelerator_path_of_the_check_finds_nan_and_inf_in_every_dtype() -> None:
    """``_finite_fused`` (the fused max-norm used for tensors on an accelerator), run here on the CPU."""
    from protloc.models.checkpoint import _finite_fused

    nan, inf = float("nan"), float("inf")
    tensors = [
        torch.tensor([1.0, nan]),
        torch.tensor([-inf, 2.0], dtype=torch.bfloat16),
        torch.tensor([3e38, 3e38]),  # large but finite: the max does not overflow
        torch.tensor([1.0, 2.0], dtype=torch.float16),
        torch.tensor([inf], dtype=torch.float16),
        torch.ones(3, dtype=torch.float64),
    ]
    assert _finite_fused(tensors) == [False, False, True, True, False, True]
    assert _finite_fused([]) == []


def test_saving_non_finite_weights_is_refused_and_keeps_the_old_checkpoint(digest, tmp_path: Path) -> None:
    model, cfg, _ = load_checkpoint(WEIGHTS / "cytoself-tiny", model_cls=Cytoself, config_cls=CytoselfConfig)
    dest = tmp_path / "ckpt"
    save_checkpoint(dest, model=model, config=cfg)
    before = digest(dest)
    name, param = next(iter(model.named_parameters()))
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError, match=f"refusing to save non-finite weights.*{name} \\(1 of "):
        save_checkpoint(dest, model=model, config=cfg)
    with pytest.raises(NonFiniteError):
        save_checkpoint(tmp_path / "new", model=model, config=cfg)
    assert digest(dest) == before
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporaries left


def test_embed_refuses_a_checkpoint_with_a_nan_tensor(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "cytoself-nan"
    shutil.copytree(WEIGHTS / "cytoself-tiny", bad)
    key = _poison(bad)
    store = _store(tmp_path / "crops.zarr")
    out = tmp_path / "emb.h5ad"
    code = main(["-q", "embed", "--checkpoint", str(bad), "--store", str(store), "--out", str(out)])
    assert code == 2
    err = _one_line_error(capsys)
    assert str(bad) in err and key in err and "NaN or Inf" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crops.csv", "crops.zarr", "cytoself-nan"]


def _celle_weights(tmp_path: Path) -> Path:
    """Copies of celle-tiny and its tokenizers (its config names them relatively, beside it)."""
    for name in ("celle-tiny", "vqgan-nucleus-tiny", "vqgan-threshold-tiny"):
        shutil.copytree(WEIGHTS / name, tmp_path / "weights" / name)
    return tmp_path / "weights"


@pytest.mark.parametrize("poisoned", ["celle-tiny", "vqgan-threshold-tiny"])
def test_predict_refuses_a_checkpoint_with_a_nan_tensor(tmp_path: Path, capsys, poisoned: str) -> None:
    weights = _celle_weights(tmp_path)
    key = _poison(weights / poisoned)
    if poisoned.startswith("vqgan"):  # as if CELL-E had been trained with it: past the tokenizer hash check
        meta_path = weights / "celle-tiny" / "config.json"
        meta = json.loads(meta_path.read_text())
        digest = hashlib.sha256((weights / poisoned / MODEL_FILE).read_bytes()).hexdigest()
        meta["extra"]["tokenizers"]["threshold_sha256"] = digest
        meta_path.write_text(json.dumps(meta))
    out = tmp_path / "pred"
    argv = ["-q", "predict", "--checkpoint", str(weights / "celle-tiny"), "--sequence", "MKTAYIAKQRQ"]
    assert main([*argv, "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert f"/{poisoned}: " in err and key in err and "NaN or Inf" in err  # celle-tiny/../vqgan-...
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# training that diverges
# --------------------------------------------------------------------------------------------------


def test_diverging_cytoself_run_stops_and_keeps_last_good_checkpoint(
    digest, tmp_path: Path, cytoself_store, capsys
) -> None:
    run = tmp_path / "run"
    argv = ["-q", "train", "cytoself", "--store", str(cytoself_store), "--out", str(run), *CYTO_ARGS]
    assert main([*argv, "--set", "schedule.max_steps=2"]) == 0
    last, best = digest(run / "last"), digest(run / "best")
    capsys.readouterr()

    resume = ["-q", "train", "cytoself", "--out", str(run), "--resume", "--set", "schedule.max_steps=8"]
    assert main([*resume, "--set", "optim.lr=1e12"]) == 2
    err = _one_line_error(capsys)
    assert f"{run}: training diverged at step " in err and "loss" in err and "NaN or infinite" in err
    assert "last/ (step 2) is intact" in err and "--resume" in err and "optim.lr (now 1e+12)" in err
    assert digest(run / "last") == last and digest(run / "best") == best
    model, _, extra = load_checkpoint(run / "last", model_cls=Cytoself, config_cls=CytoselfConfig)
    assert extra["step"] == 2 and all(torch.isfinite(t).all() for t in model.state_dict().values())

    # the good last/ resumes with a sane learning rate
    assert main([*resume, "--set", "schedule.max_steps=4", "--set", "optim.lr=1e-3"]) == 0
    assert load_checkpoint(run / "last", model_cls=Cytoself, config_cls=CytoselfConfig)[2]["step"] == 4


def test_a_run_diverging_before_its_first_checkpoint_writes_none(tmp_path: Path, cytoself_store, monkeypatch) -> None:
    """A loss turning NaN at step 2 (a patched loss) with no logging step before validation at step 4:
    cytoself's values are tensors (no host synchronisation per step), so the check before validation
    stops the run, naming the window of steps, the terms and the weights; no checkpoint is written."""
    from protloc.train.cytoself import TrainCytoselfConfig, train_cytoself

    loss = Cytoself.loss
    calls = []

    def nan_on_second_call(self, *args, **kwargs):
        out = loss(self, *args, **kwargs)
        calls.append(1)
        if self.training and len(calls) == 2:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(Cytoself, "loss", nan_on_second_call)
    base = TrainCytoselfConfig.tiny(store=str(cytoself_store))
    cfg = dataclasses.replace(
        base,
        model=base.model.replace(input_size=S),
        data=dataclasses.replace(base.data, batch_size=8, chunk_window=2),
        schedule=dataclasses.replace(base.schedule, max_steps=6, eval_every=4, log_every=50),
        save_every=0,
    )
    with pytest.raises(TrainingDiverged) as info:
        train_cytoself(cfg, run_dir=tmp_path / "run", progress=False)
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'run'}: training diverged between steps 1 and 4: loss, ") and "\n" not in msg
    assert "; the weights: " in msg and "no checkpoint was written; train again with a lower optim.lr" in msg
    assert not (tmp_path / "run" / "last").exists() and not (tmp_path / "run" / "best").exists()


def test_diverging_celle_run_stops_and_keeps_last_good_checkpoint(digest, tmp_path: Path, celle_inputs, capsys) -> None:
    run = tmp_path / "celle"
    argv = ["-q", "train", "celle", "--store", str(celle_inputs["store"]), "--out", str(run)]
    argv += ["--nucleus-vqgan", str(celle_inputs["nucleus"]), "--threshold-vqgan", str(celle_inputs["threshold"])]
    argv += ["--set", "model.grid_size=4", "--set", "model.max_residues=16", "--set", "data.image_size=32"]
    argv += ["--set", "data.crop_size=0", "--set", "data.batch_size=4", "--set", "data.chunk_window=2"]
    argv += ["--set", "optim.warmup_steps=1", "--set", "schedule.eval_every=2", "--set", "schedule.log_every=1"]
    assert main([*argv, "--set", "schedule.max_steps=2"]) == 0
    last, best = digest(run / "last"), digest(run / "best")
    capsys.readouterr()

    resume = ["-q", "train", "celle", "--out", str(run), "--resume", "--set", "schedule.max_steps=8"]
    assert main([*resume, "--set", "optim.lr=1e12"]) == 2
    err = _one_line_error(capsys)
    assert f"{run}: training diverged at step " in err and "NaN or infinite" in err
    assert "last/ (step 2) is intact" in err
    assert digest(run / "last") == last and digest(run / "best") == best
    from protloc.eval.load import load_celle_run

    loaded = load_celle_run(run / "last")
    assert all(torch.isfinite(t).all() for t in loaded.model.state_dict().values())


def test_a_diverging_vqgan_run_stops_without_a_checkpoint(tmp_path: Path, celle_inputs, capsys) -> None:
    run = tmp_path / "vq"
    argv = ["-q", "train", "vqgan", "--kind", "threshold", "--store", str(celle_inputs["store"]), "--out", str(run)]
    argv += ["--set", "data.batch_size=4", "--set", "data.image_size=32", "--set", "model.image_size=32"]
    argv += ["--set", "data.chunk_window=2", "--set", "schedule.eval_every=2", "--set", "schedule.max_steps=8"]
    assert main([*argv, "--set", "optim.lr=1e12"]) == 2
    err = _one_line_error(capsys)
    assert f"{run}: training diverged at step 2: " in err and "loss became NaN or infinite" in err
    assert "no checkpoint was written; train again with a lower optim.lr (now 1e+12)" in err
    assert not (run / "last").exists() and not (run / "best").exists()


@pytest.mark.skipif(
    shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None,
    reason="accelerate's launcher is not installed beside this Python",
)
def test_two_processes_both_stop_when_training_diverges(tmp_path: Path, cytoself_store) -> None:
    """No logging step in between: the flag all-reduced before validation / checkpoints stops both."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    cmd += ["-m", "protloc", "-q", "train", "cytoself", "--store", str(cytoself_store), "--out", str(tmp_path / "r")]
    cmd += [*CYTO_ARGS, "--set", "data.batch_size=4", "--set", "schedule.log_every=100"]
    cmd += ["--set", "schedule.max_steps=8", "--set", "optim.lr=1e12", "--set", "save_every=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    # the first update at lr 1e12 already makes the weights non-finite: caught before the step-2 checkpoint
    assert "training diverged" in proc.stderr and "no checkpoint was written" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "r" / "last").exists()


# --------------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------------


def test_embed_refuses_non_finite_encodings_and_leaves_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    store = _store(tmp_path / "crops.zarr", n=6)
    encode = Cytoself.encode
    calls = []

    def nan_rows(self, x):
        enc = encode(self, x)
        calls.append(len(x))
        if len(calls) > 1:  # the probe batch passes; the second batch (crops 2, 3) gets NaN in its 2nd crop
            enc.q2[1] = float("nan")
        return enc

    monkeypatch.setattr(Cytoself, "encode", nan_rows)
    out = tmp_path / "emb.h5ad"
    argv = ["-q", "embed", "--store", str(store), "--out", str(out), "--batch-size", "2", "--shard-size", "2"]
    ckpt = WEIGHTS / "cytoself-tiny"
    assert main([*argv, "--checkpoint", str(ckpt)]) == 2
    err = _one_line_error(capsys)
    assert str(ckpt) in err and "global encodings of 1 crop(s) are NaN or infinite" in err
    assert "store rows 1 (crop_index " in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crops.csv", "crops.zarr"]  # no .h5ad, no .partial


def test_predict_refuses_non_finite_token_probabilities(tmp_path: Path, monkeypatch, capsys) -> None:
    import protloc.eval.predict as predict_module

    generate = predict_module.generate

    def nan_probs(*args, **kwargs):
        result = generate(*args, **kwargs)
        result.probs[1] = float("nan")  # the second input
        return result

    monkeypatch.setattr(predict_module, "generate", nan_probs)
    fasta = tmp_path / "q.fasta"
    fasta.write_text(">a\nMKTAYIAKQRQ\n>b\nPKKKRKVPKKKRKV\n")
    out = tmp_path / "pred"
    argv = ["-q", "predict", "--checkpoint", str(WEIGHTS / "celle-tiny"), "--fasta", str(fasta), "--out", str(out)]
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert "token probabilities are NaN or infinite for input 1 (PKKKRKVPKKKR..., 14 aa)" in err
    assert str(WEIGHTS / "celle-tiny") in err
    assert not out.exists()
