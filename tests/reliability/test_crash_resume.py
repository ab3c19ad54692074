"""Crash safety of training: SIGKILL a real `protloc train` process at random points, several times.

Each kill may land anywhere: in the middle of a step, of a validation, or of writing a checkpoint. After
every kill the last checkpoint must load (never a half-written file), ``--resume`` alone must continue
from it, and the run that was killed and resumed must end with the same weights and the same loss curve
as a run that was never interrupted (one thread, deterministic data order: exactly the same).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from protloc.models.checkpoint import load_checkpoint
from protloc.models.cytoself import Cytoself, CytoselfConfig
from protloc.train.loop import MetricsLogger

S = 32  # the crop side of the cytoself_store fixture (conftest.py)
STEPS = 60
ARGS = [
    "--set",
    f"model.input_size={S}",
    "--set",
    "data.batch_size=8",
    "--set",
    "data.chunk_window=2",
    "--set",
    f"schedule.max_steps={STEPS}",
    "--set",
    "schedule.eval_every=6",
    "--set",
    "schedule.log_every=1",
    "--set",
    "save_every=4",
]


def _train(store: Path, out: Path, *, resume: bool) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-m", "protloc", "-q", "train", "cytoself", "--out", str(out)]
    cmd += ["--resume"] if resume else ["--store", str(store), *ARGS]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _curve(run: Path) -> list[tuple[int, str, float]]:
    return [(r["step"], r["split"], round(float(r["loss"]), 6)) for r in MetricsLogger.read(run / "metrics.jsonl")]


def _last_step(run: Path) -> int:
    """The last step logged so far (a line being written is skipped)."""
    try:
        lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return -1
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return -1


# a second set of kill points runs with `-m slow` (40 s): the default run stays under 10 minutes on 2 cores
@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_sigkill_at_random_points_then_resume_matches_an_uninterrupted_run(
    tmp_path: Path, seed: int, cytoself_store: Path
) -> None:
    store = cytoself_store
    ref = _train(store, tmp_path / "ref", resume=False)
    assert ref.wait(timeout=600) == 0, ref.stderr.read()[-2000:]

    rng = random.Random(seed)
    run = tmp_path / "killed"
    # Kill when the run has logged a random step (three points, each past the previous one), plus a
    # random extra delay of up to 30 ms so the kill also lands inside steps, validations and saves.
    for target in sorted(rng.sample(range(3, STEPS - 3), 3)):
        proc = _train(store, run, resume=(run / "last").is_dir())
        deadline = time.monotonic() + 300
        while _last_step(run) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, f"the run ended before step {target}: {proc.stderr.read()[-2000:]}"
        time.sleep(rng.uniform(0.0, 0.03))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        last = run / "last"
        if last.is_dir():  # whatever the moment of the kill, the last checkpoint is whole
            _, _, extra = load_checkpoint(last, model_cls=Cytoself, config_cls=CytoselfConfig)
            assert 0 < extra["step"] <= STEPS
            assert (last / "trainer_state.pt").is_file()
    proc = _train(store, run, resume=(run / "last").is_dir())
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]

    a = load_file(str(tmp_path / "ref" / "last" / "model.safetensors"))
    b = load_file(str(run / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    assert _curve(run) == _curve(tmp_path / "ref")  # no step lost, none logged twice
    # temporary files of writes the kills interrupted are cleaned up when the run resumes
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []


def test_startup_time_is_short_enough_for_the_kill_window() -> None:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "protloc", "--help"], check=True, capture_output=True)
    assert time.perf_counter() - t0 < 15
