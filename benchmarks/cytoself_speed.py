"""Cost of the cytoself presets: FLOPs, training and embedding throughput, peak memory, CPU levers.

Run: ``.venv/bin/python benchmarks/cytoself_speed.py [--configs tiny,small,paper] [--settings ...]
[--steps N] [--batch 32] [--embed-batch 256] [--store runs/demo/prepared/cytoself.zarr] [--device cpu|cuda]
[--peak-gflops G] [--json out.json]``

For each preset and each training setting, in a fresh subprocess (so peak resident memory does not mix):

- FLOPs per image (``torch.utils.flop_counter.FlopCounterMode``; convolutions and matrix products) of the
  forward pass, of forward + backward of ``model.loss``, of decoder1 alone, and of ``encode``;
- training images/s: ``model.loss(batch)["loss"].backward()`` + Adam (lr 4e-4) at ``--batch`` (32), timed
  over a few steps after warm-up, under one of the settings (the levers, cumulative left to right):

  - ``nchw-fp32``: contiguous NCHW tensors, float32, Adam's default (foreach) update;
  - ``fp32``: channels-last memory layout (the model's default);
  - ``fp32-fused``: + the fused Adam kernel (what the trainer uses);
  - ``bf16-fused``: + bfloat16 autocast (``mixed_precision=bf16``; native on AVX512-BF16 / AMX CPUs);

- embedding images/s: eval-mode ``model.encode`` at ``--embed-batch`` with BatchNorm folded
  (``fuse_for_inference``, as ``protloc embed`` runs it), float32;
- data loading: with ``--store``, the time to read and augment one training batch from a crop store
  (``CropDataset.read_batch`` on the trainer's chunk-window order), as a share of a training step --
  whether overlapping loading with compute (``data.num_workers``) can pay on this machine;
- achieved GFLOP/s and its share of ``--peak-gflops`` (default: measured in the same run, a 2048^3
  float32 matmul on all threads; bf16 rows are compared with the same number), and peak RSS.

On a CPU without native bfloat16 the bf16 settings are skipped (emulated bfloat16 is slower than
float32, and the trainer falls back to float32 there); the JSON names the CPU.

``paper`` is the published configuration (decoder1 64 wide), ``small`` the CPU training preset,
``reference_wide`` what the PyTorch reference runs (decoder1 640 wide, decoder2 576, two 3x3 convolutions
per residual layer; float32 only). On shared machines absolute times are noisy; the load average is
recorded with each row, and ratios between rows of one run are what to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from protloc.models.cytoself import Cytoself, CytoselfConfig
from protloc.train.loop import cpu_has_bf16, cpu_name

PRESETS = {
    "tiny": CytoselfConfig.tiny,
    "small": CytoselfConfig.small,
    "paper": CytoselfConfig.paper,
    "reference_wide": CytoselfConfig.reference_wide,
}
# Timed training steps (after warm-up steps) per preset when --steps is not given: keeps the whole run
# within about 10 minutes on a 2-core CPU.
DEFAULT_STEPS = {"tiny": (2, 10), "small": (2, 6), "paper": (1, 5), "reference_wide": (0, 2)}
# setting -> (channels_last, fused Adam, bf16 autocast)
SETTINGS = {
    "nchw-fp32": (False, False, False),
    "fp32": (True, False, False),
    "fp32-fused": (True, True, False),
    "bf16-fused": (True, True, True),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(cfg: CytoselfConfig, n: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    y = torch.randint(0, cfg.num_classes, (n,), generator=g)
    return {"image": x.to(device), "label": y.to(device)}


def _conv_backward_flop(
    grad_out_shape,
    x_shape,
    w_shape,
    _bias,
    _stride,
    _padding,
    _dilation,
    transposed,
    _output_padding,
    _groups,
    output_mask,
    out_shape=None,
    **kwargs,
) -> int:
    """Convolution backward FLOPs: one forward-sized convolution per requested gradient (input, weight).

    torch's built-in formula computes the weight gradient as if ``groups == 1``, which overcounts a
    depthwise convolution by its channel count (10x the true total for the paper model).
    """
    fwd = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def _flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop})


def _count_flops(model: Cytoself, cfg: CytoselfConfig, device: torch.device) -> dict[str, float]:
    """FLOPs per image, counted on a batch of 2 (BatchNorm in train mode needs more than one value)."""
    n = 2
    batch = _batch(cfg, n, device, seed=1)
    model.train()
    with _flop_counter() as fc:
        model(batch["image"])
    per_module = fc.get_flop_counts()
    fwd = fc.get_total_flops() / n
    dec1 = sum(per_module.get("Cytoself.decoder1", {}).values()) / n
    with _flop_counter() as fc:
        model.loss(batch)["loss"].backward()
    fwd_bwd = fc.get_total_flops() / n
    model.zero_grad(set_to_none=True)
    with _flop_counter() as fc:
        model.encode(batch["image"])
    enc = fc.get_total_flops() / n
    return {
        "fwd_gflop": fwd / 1e9,
        "fwd_bwd_gflop": fwd_bwd / 1e9,
        "decoder1_fwd_gflop": dec1 / 1e9,
        "encode_gflop": enc / 1e9,
    }


def _load_time(store_path: Path, cfg: CytoselfConfig, batch_size: int, batches: int = 20) -> float:
    """Seconds to read + augment one training batch, in the trainer's chunk-window order."""
    import numpy as np

    from protloc.data.datasets import CropDataset
    from protloc.data.io import CropStore

    store = CropStore.open(store_path)
    ds = CropDataset(store, split="train", channels=cfg.channels, label_map=None, augment=True, cache_chunks=17)
    rng = np.random.default_rng(0)
    start = int(rng.integers(0, max(1, len(ds) - batch_size * batches)))
    window = np.arange(start, min(len(ds), start + batch_size * batches))
    rng.shuffle(window)
    t0 = time.perf_counter()
    for b in range(batches):
        ds.read_batch(window[b * batch_size : (b + 1) * batch_size])
    return (time.perf_counter() - t0) / batches


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    name, setting = args.worker.split(":")
    channels_last, fused, bf16 = SETTINGS[setting]
    device = torch.device(args.device)
    cfg = PRESETS[name](num_classes=args.num_classes)
    torch.manual_seed(0)
    model = Cytoself(cfg).to(device)
    model.channels_last = channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    row: dict[str, Any] = {
        "config": name,
        "setting": setting,
        "channels_last": channels_last,
        "fused_adam": fused,
        "bf16": bf16,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "parameters": model.num_parameters(),
        "load_before": os.getloadavg()[0],
    }
    row.update(_count_flops(model, cfg, device))

    warmup, steps = DEFAULT_STEPS[name]
    if args.steps is not None:
        steps = args.steps
    if args.warmup is not None:
        warmup = args.warmup
    batch_size = args.batch if args.batch is not None else 32
    batch = _batch(cfg, batch_size, device)
    opt = torch.optim.Adam(model.parameters(), lr=4e-4, fused=fused, foreach=None if fused else True)
    model.train()
    times, cpu = [], []
    for i in range(warmup + steps):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    step_s = sum(times) / len(times)
    # CPU seconds per wall second: about the thread count when the machine is ours alone, less when
    # other processes take cores (then the throughput numbers understate the code).
    row.update(
        {
            "train_batch": batch_size,
            "train_warmup": warmup,
            "train_steps": steps,
            "train_step_s": step_s,
            "train_img_s": batch_size / step_s,
            "train_cpu_per_wall": sum(cpu) / sum(times),
            "loss_last": float(loss.detach()),
        }
    )
    row["train_gflop_s"] = row["train_img_s"] * row["fwd_bwd_gflop"]
    if args.store is not None:
        row["load_batch_s"] = _load_time(args.store, cfg, batch_size)
        row["load_share_of_step"] = row["load_batch_s"] / step_s
    del batch, opt, loss
    model.zero_grad(set_to_none=True)

    x = _batch(cfg, args.embed_batch, device, seed=2)["image"]
    # what `protloc embed` runs: eval mode, BatchNorm folded into the convolutions, no autograd
    model.fuse_for_inference()
    torch.set_grad_enabled(False)
    model.encode(x)  # warm-up
    times = []
    for _ in range(args.embed_steps):
        _sync(device)
        t0 = time.perf_counter()
        model.encode(x)
        _sync(device)
        times.append(time.perf_counter() - t0)
    embed_s = sum(times) / len(times)
    row.update({"embed_batch": args.embed_batch, "embed_img_s": args.embed_batch / embed_s})
    row["embed_gflop_s"] = row["embed_img_s"] * row["encode_gflop"]
    row["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
    if device.type == "cuda":
        row["peak_device_gb"] = torch.cuda.max_memory_allocated(device) / 1024**3
    row["load_after"] = os.getloadavg()[0]
    return row


def _run_subprocess(name: str, setting: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        f"{name}:{setting}",
        "--device",
        args.device,
        "--embed-batch",
        str(args.embed_batch),
        "--embed-steps",
        str(args.embed_steps),
        "--num-classes",
        str(args.num_classes),
    ]
    for flag, value in (
        ("--steps", args.steps),
        ("--warmup", args.warmup),
        ("--batch", args.batch),
        ("--store", args.store),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"benchmark worker for {name!r} failed with exit code {proc.returncode}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    row = json.loads(lines[-1][len("RESULT ") :])
    row["wall_s"] = time.perf_counter() - t0
    return row


def _print_table(rows: list[dict[str, Any]], peak: float) -> None:
    header = (
        f"{'config':<15} {'setting':<10} {'params':>7} {'fwd GF':>7} {'f+b GF':>7} {'dec1 GF':>8} {'train img/s':>11} "
        f"{'train GF/s':>10} {'%peak':>6} {'embed img/s':>11} {'emb GF/s':>9} {'%peak':>6} {'RSS GB':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['config']:<15} {r['setting']:<10} {r['parameters'] / 1e6:>6.1f}M "
            f"{r['fwd_gflop']:>7.2f} {r['fwd_bwd_gflop']:>7.2f} "
            f"{r['decoder1_fwd_gflop']:>8.2f} {r['train_img_s']:>11.2f} {r['train_gflop_s']:>10.1f} "
            f"{100 * r['train_gflop_s'] / peak:>5.1f}% {r['embed_img_s']:>11.1f} {r['embed_gflop_s']:>9.1f} "
            f"{100 * r['embed_gflop_s'] / peak:>5.1f}% {r['peak_rss_gb']:>7.2f}"
            + (f"   load {100 * r['load_share_of_step']:.1f}% of a step" if "load_share_of_step" in r else "")
        )


def _matmul_gflops(device: torch.device, n: int = 2048, reps: int = 5) -> float:
    """Achieved float32 GFLOP/s of an n x n x n matmul: the practical peak the %peak columns divide by."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--configs", default="tiny,small,paper", help="comma-separated presets out of: " + ", ".join(PRESETS)
    )
    parser.add_argument(
        "--settings",
        default=",".join(SETTINGS),
        help="comma-separated training settings out of: " + ", ".join(SETTINGS),
    )
    parser.add_argument("--store", type=Path, default=None, help="a crop store, to time data loading")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default per preset)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed training steps (default per preset)")
    parser.add_argument("--batch", type=int, default=None, help="training batch size (default 32)")
    parser.add_argument("--embed-batch", type=int, default=256)
    parser.add_argument("--embed-steps", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=1311)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--peak-gflops",
        type=float,
        default=None,
        help="fp32 peak of the machine for the %%peak columns (default: measured, a 2048^3 float32 matmul)",
    )
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/cytoself_speed.json"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker is not None:
        print("RESULT " + json.dumps(_worker(args)), flush=True)
        return

    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {', '.join(PRESETS)}")
    settings = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = [n for n in settings if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; choose from {', '.join(SETTINGS)}")
    native_bf16 = torch.cuda.is_available() if args.device.startswith("cuda") else cpu_has_bf16()
    if not native_bf16 and any(SETTINGS[s][2] for s in settings):
        # Emulated bfloat16 is slower than float32: the trainer itself falls back to float32 there.
        print("this CPU has no native bfloat16: skipping the bf16 settings", file=sys.stderr)
        settings = [s for s in settings if not SETTINGS[s][2]]
    if args.peak_gflops is None:
        args.peak_gflops = _matmul_gflops(torch.device(args.device))
    rows = []
    for name in names:
        # The wide reference model: float32 only (each step is about 15 TFLOP).
        for setting in ["fp32"] if name == "reference_wide" else settings:
            print(f"[{name} {setting}] running ...", file=sys.stderr, flush=True)
            rows.append(_run_subprocess(name, setting, args))
    for r in rows:
        r["train_peak_share"] = r["train_gflop_s"] / args.peak_gflops
        r["embed_peak_share"] = r["embed_gflop_s"] / args.peak_gflops
    _print_table(rows, args.peak_gflops)
    out = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "peak_gflops": args.peak_gflops,
            "cpu": cpu_name(),
            "native_bf16": native_bf16,
        },
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"},
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
