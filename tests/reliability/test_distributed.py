"""Data-parallel training: ``accelerate launch`` with 2 CPU processes (gloo) trains like 1 process.

Each case trains the same tiny model twice on the same store: once in one process with batch ``2b``,
once under ``accelerate launch --multi_gpu --num_processes 2`` (on a machine without GPUs Accelerate
starts CPU processes that talk over gloo) with batch ``b`` per process, so the global batch, the data
order and the augmentation are the same. The logged training losses (averaged over the processes),
the validation losses and the trained models must agree to within floating-point reassociation.

What the tolerances are measured against (tiny cytoself, 10 steps): one process with 1 thread vs one
process with 2 threads differs by up to ~1e-5 in the loss curve and 1.5e-7 (relative) in the protein-ID
logits; Adam turns the rounding noise of parameters whose gradient is zero in exact arithmetic (biases
of BatchNorms followed by another BatchNorm) into steps of size ``lr``, so those raw weights are not
compared. Two processes with per-process BatchNorm statistics (``sync_batchnorm=false``) are off by
~4e-2 in the loss curve and ~5e-2 in the logits: the negative control shows the test can fail.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from protloc.data.io import CropStore
from protloc.models.celle import Celle, CelleConfig
from protloc.models.checkpoint import load_checkpoint
from protloc.models.cytoself import Cytoself, CytoselfConfig
from protloc.train.loop import MetricsLogger

S = 32  # the crop side of the cytoself_store fixture (conftest.py)
CYTO_ARGS = [
    "--set",
    f"model.input_size={S}",
    "--set",
    "data.chunk_window=2",
    "--set",
    "schedule.max_steps=10",
    "--set",
    "schedule.eval_every=5",
    "--set",
    "schedule.log_every=1",
    "--set",
    "save_every=5",
]
CELLE_ARGS = [
    "--set",
    "model.grid_size=4",
    "--set",
    "model.max_residues=16",
    "--set",
    "data.image_size=32",
    "--set",
    "data.crop_size=0",
    "--set",
    "data.chunk_window=2",
    "--set",
    "optim.warmup_steps=1",
    "--set",
    "schedule.max_steps=8",
    "--set",
    "schedule.eval_every=4",
    "--set",
    "schedule.log_every=1",
    # dropout draws from each process's own random stream; without it the two runs are deterministic
    "--set",
    "model.attn_dropout=0",
    "--set",
    "model.ff_dropout=0",
]

pytestmark = pytest.mark.skipif(
    shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None,
    reason="accelerate's launcher is not installed beside this Python",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp: Path) -> dict[str, str]:
    # one thread per process (deterministic, and 2 processes fit 2 cores); HF_HOME keeps a user's saved
    # `accelerate config` out of the test
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HOME": str(tmp / "hf")}


def _run(cmd: list[str], tmp: Path) -> None:
    proc = subprocess.run(cmd, env=_env(tmp), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _protloc(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "protloc", "-q", *args]


def _launch(args: list[str], processes: int = 2) -> list[str]:
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    return [
        launcher,
        "launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "protloc",
        "-q",
        *args,
    ]


def _curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {"train": [], "val": []}
    for r in MetricsLogger.read(run / "metrics.jsonl"):
        out[r["split"]].append((r["step"], float(r["loss"])))
    return out


def _max_gap(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> float:
    assert [s for s, _ in a] == [s for s, _ in b]
    return max(abs(x - y) for (_, x), (_, y) in zip(a, b, strict=True))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _cytoself_logits(run: Path, store: Path) -> torch.Tensor:
    model = load_checkpoint(run / "last", model_cls=Cytoself, config_cls=CytoselfConfig)[0].eval()
    crops = CropStore.open(store).read(np.arange(0, 120, 4), channels=["protein", "nucleus_distance"])
    x = torch.from_numpy(np.stack([crops["protein"], crops["nucleus_distance"]], 1).astype(np.float32))
    with torch.no_grad():
        return model(x).logits2


def test_cytoself_two_processes_train_like_one_with_the_global_batch(tmp_path: Path, cytoself_store: Path) -> None:
    store = cytoself_store
    base = ["train", "cytoself", "--store", str(store), *CYTO_ARGS]
    _run(_protloc([*base, "--out", str(tmp_path / "one"), "--set", "data.batch_size=8"]), tmp_path)
    _run(_launch([*base, "--out", str(tmp_path / "two"), "--set", "data.batch_size=4"]), tmp_path)
    _run(
        _launch(
            [*base, "--out", str(tmp_path / "unsynced"), "--set", "data.batch_size=4", "--set", "sync_batchnorm=false"]
        ),
        tmp_path,
    )
    one, two, unsynced = (_curves(tmp_path / r) for r in ("one", "two", "unsynced"))
    assert len(one["train"]) == 10 and len(one["val"]) == 2
    # 2 x 10 steps x 4 crops: the launcher really started two processes
    state = torch.load(tmp_path / "two" / "last" / "trainer_state.pt", weights_only=False)
    assert state["images_seen"] == 80 and len(state["rng_ranks"]) == 2
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])  # own random streams
    assert _max_gap(two["train"], one["train"]) < 2e-4
    assert _max_gap(two["val"], one["val"]) < 5e-4
    logits = {r: _cytoself_logits(tmp_path / r, store) for r in ("one", "two", "unsynced")}
    assert _rel(logits["two"], logits["one"]) < 1e-3
    # negative control: per-process BatchNorm statistics are not the global batch's
    assert _max_gap(unsynced["train"], one["train"]) > 5e-3
    assert _rel(logits["unsynced"], logits["one"]) > 1e-2


def test_celle_two_processes_train_like_one_with_the_global_batch(tmp_path: Path, celle_inputs) -> None:
    base = [
        "train",
        "celle",
        "--store",
        str(celle_inputs["store"]),
        "--nucleus-vqgan",
        str(celle_inputs["nucleus"]),
        "--threshold-vqgan",
        str(celle_inputs["threshold"]),
        *CELLE_ARGS,
    ]
    _run(_protloc([*base, "--out", str(tmp_path / "one"), "--set", "data.batch_size=4"]), tmp_path)
    _run(_launch([*base, "--out", str(tmp_path / "two"), "--set", "data.batch_size=2"]), tmp_path)
    one, two = _curves(tmp_path / "one"), _curves(tmp_path / "two")
    assert len(one["train"]) == 8
    state = torch.load(tmp_path / "two" / "last" / "trainer_state.pt", weights_only=False)
    assert state["samples_seen"] == 32
    # the sequences differ in length, so the text term is a mean over the global batch's residues only
    # because each process divides its summed loss by the residue count of all processes
    assert _max_gap(two["train"], one["train"]) < 2e-4
    assert _max_gap(two["val"], one["val"]) < 5e-4
    a = load_checkpoint(tmp_path / "one" / "last", model_cls=Celle, config_cls=CelleConfig)[0].state_dict()
    b = load_checkpoint(tmp_path / "two" / "last", model_cls=Celle, config_cls=CelleConfig)[0].state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4, msg=key)
