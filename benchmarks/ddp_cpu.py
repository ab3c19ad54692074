"""Data-parallel training on CPU: 1 process vs 2 processes (gloo), with and without synchronised BatchNorm.

Usage: ``.venv/bin/python benchmarks/ddp_cpu.py [--steps 40] [--batch 16] [--json benchmarks/results/ddp_cpu.json]``

Trains the ``tiny`` cytoself on a synthetic 100 px crop store four ways, all with the same global batch
(``2 x --batch``):

- one process with 2 threads and batch ``2 x --batch`` (the reference);
- the same with 1 thread: floating-point sums in another order, whose drift from the reference over
  the run is the floor for the loss gaps below (Adam amplifies rounding differences);
- ``accelerate launch`` with 2 processes of 1 thread and batch ``--batch`` each, BatchNorm statistics
  synchronised (``sync_batchnorm=true``, the default);
- the same with per-process BatchNorm (``sync_batchnorm=false``).

It reports training images/s (median of the logged windows after the first, so start-up and the first
steps are left out), the ratio to one process, and the largest gap between each run's loss curve and
the reference curve. On one 2-core machine the ratio shows the cost of splitting the work into
processes plus gloo's communication over loopback; it says nothing about GPUs and NCCL.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from protloc.data.io import CropStore
from protloc.train.loop import MetricsLogger

S = 100


def _store(path: Path, n: int = 960) -> Path:
    rng = np.random.default_rng(0)
    fov = np.arange(n) // 20
    obs = pd.DataFrame(
        {
            "protein_id": [f"P{f % 5}" for f in fov],
            "fov_id": [f"f{f}" for f in fov],
            "split": [("train", "train", "train", "val")[f % 4] for f in fov],
        }
    )
    protein = rng.random((n, S, S)).astype(np.float32)
    chans = {"protein": "float16", "nucleus_distance": "float16"}
    with CropStore.create(path, channels=chans, size=S, chunk=64) as w:
        w.append({"protein": protein, "nucleus_distance": 2 * protein - 1}, obs)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(name: str, cmd: list[str], threads: int, work: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HOME": str(work / "hf")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")


def _curve(run: Path) -> tuple[list[float], list[float]]:
    recs = [r for r in MetricsLogger.read(run / "metrics.jsonl") if r["split"] == "train"]
    return [float(r["loss"]) for r in recs], [float(r["images_per_s"]) for r in recs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16, help="per process; one process uses twice this")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/ddp_cpu.json"))
    args = ap.parse_args()
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        store = _store(work / "cytoself.zarr")
        common = [
            "train",
            "cytoself",
            "--preset",
            "tiny",
            "--store",
            str(store),
            "--set",
            f"schedule.max_steps={args.steps}",
            "--set",
            "schedule.eval_every=0",
            "--set",
            "schedule.log_every=5",
            "--set",
            "save_every=0",
            "--set",
            "data.chunk_window=4",
        ]
        launch = [
            launcher,
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ]
        one = [sys.executable, "-m", "protloc", "-q", *common, "--set", f"data.batch_size={2 * args.batch}"]
        runs = {
            "1 process x 2 threads": (one, 2),
            # the floor: the same run summed in another order (1 thread) drifts this far from the first
            "1 process x 1 thread": (one, 1),
            "2 processes x 1 thread, synchronised BatchNorm": (
                [
                    *launch,
                    "--main_process_port",
                    str(_free_port()),
                    "-m",
                    "protloc",
                    "-q",
                    *common,
                    "--set",
                    f"data.batch_size={args.batch}",
                ],
                1,
            ),
            "2 processes x 1 thread, per-process BatchNorm": (
                [
                    *launch,
                    "--main_process_port",
                    str(_free_port()),
                    "-m",
                    "protloc",
                    "-q",
                    *common,
                    "--set",
                    f"data.batch_size={args.batch}",
                    "--set",
                    "sync_batchnorm=false",
                ],
                1,
            ),
        }
        rows = []
        base_loss = base_speed = None
        for i, (name, (cmd, threads)) in enumerate(runs.items()):
            out = work / f"run{i}"
            _run(name, [*cmd, "--out", str(out)], threads, work)
            losses, speeds = _curve(out)
            speed = statistics.median(speeds[1:]) if len(speeds) > 1 else speeds[0]
            if base_loss is None:
                base_loss, base_speed = losses, speed
            rows.append(
                {
                    "run": name,
                    "images_per_s": round(speed, 1),
                    "vs_one_process": round(speed / base_speed, 3),
                    "max_loss_gap_vs_one_process": float(
                        max(abs(a - b) for a, b in zip(losses, base_loss, strict=True))
                    ),
                }
            )
    width = max(len(r["run"]) for r in rows)
    print(f"{'run':<{width}}  images/s  vs 1 process  max |loss - 1 process|")
    for r in rows:
        print(
            f"{r['run']:<{width}}  {r['images_per_s']:8.1f}  {r['vs_one_process']:12.3f}  "
            f"{r['max_loss_gap_vs_one_process']:.2e}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": {"cpus": os.cpu_count()}, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
