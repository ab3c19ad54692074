"""Cost of CELL-E generation: seconds per prediction, predictions/s, FLOPs and share of the matmul peak.

Run: ``.venv/bin/python benchmarks/celle_speed.py [--cases ...] [--quick] [--device cpu|cuda]
[--threads 2] [--peak-gflops 190] [--ar-tokens N] [--json out.json]``

Each case is one model configuration x generation mode x batch size, timed around
:func:`protloc.eval.predict.generate` (eval mode, no autograd, as ``protloc predict`` runs it) on random
weights and random inputs (the cost does not depend on the values):

- ``tiny``: :meth:`CelleConfig.tiny` (depth 2, width 64, 300 residues, 8 x 8 grids);
- ``depth4``: the paper layout (1001 text + 256 nucleus + 256 threshold positions, width 768, 16 x 64
  heads) at depth 4, the configuration the reference's ~6.5 s per (cached) prediction was measured at;
- ``paper``: the published depth-32 model.

Modes: ``ar`` is the autoregressive CELL-E (text + nucleus in one cached step, then 255 cached one-token
steps); ``masked S`` is the CELL-E 2 mode with ``S`` bidirectional full passes.

Cases are ``model:mode:batch[:precision][:rN]``: ``bf16`` runs the transformer in bfloat16, ``int8`` with
int8 weights in its blocks (``protloc predict --precision bf16|int8``; default fp32); ``rN`` gives
sequences of ``N`` residues instead of a full window (the padding after them is left out of the passes,
so a typical protein, e.g. ``r430``, the median of the reference world, costs less than the worst case;
such rows are not compared to the reference).

Text input: a random ``text_emb [B, 1001, 768]`` (all positions real: a full-length sequence) with its
``text_ids`` / ``text_mask`` is given directly. The sequence embedder (TAPE in the paper; not installed
here) runs once per prediction, outside the generation, and is *not* in these times. Its cost is shown by
the ``tape_standin`` row: a BERT-base-sized stand-in (12 ``nn.TransformerEncoderLayer`` of width 768, 12
heads, feed-forward 3072, TAPE's architecture with random weights) over 1002 tokens, once per prediction;
the reference re-ran TAPE at every one of the 256 steps.

Measurement: one untimed run (under ``torch.utils.flop_counter.FlopCounterMode``, which counts the
matrix products and ``scaled_dot_product_attention``, the CPU flash kernel through a custom formula, all
query x key pairs even where causal; it doubles as warm-up), then ``--repeats`` timed
runs (best kept, all recorded). FLOPs per prediction do not depend on the batch size, and a masked
generation of ``S`` steps is ``S`` identical full passes, so costly cases count one pass at batch 1 and
scale (``flops_scaled``). In autoregressive runs every ``Celle.forward_step`` call is timed, which splits
the time into the prompt (text + nucleus, 1257 positions at the paper size), the 255 one-token steps and
the rest (sampling). With ``--ar-tokens N`` the autoregressive generation stops after ``N`` threshold
tokens and the full time is extrapolated as prompt + 255 x mean step (marked ``extrapolated``).

Achieved GFLOP/s are compared to ``--peak-gflops`` (default 190, the stated fp32 matmul peak of the 2-core
machine the other benchmarks use) and to a peak measured here (best of a few 2048 x 2048 fp32 matmuls at
the same thread count). The load average before and after each case is recorded: on a shared machine
other processes take cores and the times overstate the code's cost.

The reference implementation needs about 6.5 s per prediction at depth 4 (cached) and about 31 minutes
at the paper configuration on this kind of machine (``REFERENCE_S`` below; ``speedup`` compares to them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from protloc.eval.load import PRECISIONS, set_precision
from protloc.eval.predict import SamplingConfig, generate
from protloc.models.celle import Celle, CelleConfig

MODELS: dict[str, Callable[[], CelleConfig]] = {
    "tiny": CelleConfig.tiny,
    "depth4": lambda: CelleConfig.paper().replace(depth=4),
    "paper": CelleConfig.paper,
}
#: Reference seconds per prediction (autoregressive, batch 1) on the 2-core CPU: depth 4 with its cache
#: and the paper model (about 31 minutes), from the issue.
REFERENCE_S = {"depth4": 6.5, "paper": 31 * 60.0}
#: Cases ``model:mode:batch``; mode ``ar`` or ``mS`` (masked, S steps).
DEFAULT_CASES = (
    "tiny:ar:1,tiny:ar:8,tiny:m8:1,tiny:m8:8,"
    "depth4:ar:1,depth4:ar:8,depth4:m8:1,depth4:m8:8,"
    "depth4:ar:1:bf16,depth4:ar:1:int8,"
    "paper:ar:1,paper:ar:1:bf16,paper:ar:1:int8,paper:ar:1:int8:r430,paper:m1:1,paper:m1:1:bf16,paper:m8:1,"
    "paper:m8:1:bf16,tape_standin,paper:ar:8,paper:ar:8:bf16,paper:ar:8:int8"
)
QUICK_CASES = "tiny:ar:1,tiny:ar:8,tiny:m8:1,tiny:m8:8,depth4:ar:1,depth4:m1:1"
#: Counting FLOPs costs a whole extra generation: from this many positions x depth x batch (x steps), count
#: at batch 1, one pass (masked) or the prompt + ``_COUNT_AR_TOKENS`` steps (autoregressive), and scale.
_COSTLY = 4 * 1513 * 8
_COUNT_AR_TOKENS = 16


def _cpu_flash_flop(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    """FLOPs of the CPU flash-attention kernel, which torch's counter leaves out (its formula covers the
    CUDA kernels only): both products, over all query x key pairs (causal masking not discounted)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _int8_mm_flop(x_shape, w_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    """FLOPs of ``torch._weight_int8pack_mm`` (the int8-weight product of ``--precision int8``): ``2 M N K``."""
    return 2 * x_shape[0] * x_shape[1] * w_shape[0]


def _flop_counter() -> FlopCounterMode:
    return FlopCounterMode(
        display=False,
        custom_mapping={
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flop,
            torch.ops.aten._weight_int8pack_mm: _int8_mm_flop,
        },
    )


class _StopGeneration(Exception):
    """Raised from the timed ``forward_step`` to end an autoregressive generation early."""


class _StepTimer:
    """Wraps ``model.forward_step``: wall time (and FLOPs, under a counter) of every call."""

    def __init__(self, model: Celle, device: torch.device, stop_after: int | None = None):
        self.model = model
        self.inner = model.forward_step
        self.device = device
        self.stop_after = stop_after  # number of one-token steps after the prompt
        self.times: list[float] = []
        self.flops: list[int] = []
        self.counter: FlopCounterMode | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.stop_after is not None and len(self.times) > self.stop_after:
            raise _StopGeneration
        _sync(self.device)
        f0 = self.counter.get_total_flops() if self.counter is not None else 0
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        _sync(self.device)
        self.times.append(time.perf_counter() - t0)
        if self.counter is not None:
            self.flops.append(self.counter.get_total_flops() - f0)
        return out

    def __enter__(self) -> _StepTimer:
        self.model.forward_step = self  # instance attribute shadows the method
        return self

    def __exit__(self, *exc: object) -> None:
        del self.model.forward_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak(device: torch.device, n: int = 2048, reps: int = 5) -> float:
    """Best fp32 GFLOP/s of ``n x n`` matrix products at the current thread count."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)
    a @ b  # warm-up
    best = math.inf
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _inputs(
    cfg: CelleConfig, batch: int, device: torch.device, seed: int = 0, residues: int | None = None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Random text of ``residues`` residues (default: a full window) padded to ``text_len``, and nucleus tokens."""
    g = torch.Generator().manual_seed(seed)
    L = cfg.text_len
    real = L if residues is None else 1 + residues
    ids = torch.randint(5, 30, (batch, L), generator=g)
    ids[:, 0] = 2  # <cls> = BOS
    mask = torch.zeros(batch, L, dtype=torch.bool)
    mask[:, :real] = True
    ids[~mask] = 0
    text = {
        "text_emb": (torch.randn(batch, L, cfg.text_dim, generator=g) * mask[..., None]).to(device),
        "text_ids": ids.to(device),
        "text_mask": mask.to(device),
    }
    nucleus = torch.randint(0, cfg.num_nucleus_codes, (batch, cfg.grid_tokens), generator=g).to(device)
    return text, nucleus


def _parse_case(case: str) -> tuple[str, str, int, int, str, int | None]:
    """``model:mode:batch[:precision][:rN]`` -> (model, mode, steps, batch, precision, residues)."""
    name, mode, batch, *extra = case.split(":")
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r} in case {case!r}; choose from {', '.join(MODELS)}")
    precision, residues = "fp32", None
    for e in extra:
        if e in PRECISIONS:
            precision = e
        elif e.startswith("r") and e[1:].isdigit():
            residues = int(e[1:])
        else:
            raise SystemExit(f"unknown field {e!r} in case {case!r}: fp32, bf16, int8 or r<residues>")
    if mode == "ar":
        return name, "autoregressive", 0, int(batch), precision, residues
    if mode.startswith("m") and mode[1:].isdigit():
        return name, "masked", int(mode[1:]), int(batch), precision, residues
    raise SystemExit(f"unknown mode {mode!r} in case {case!r}: 'ar' or 'm<steps>'")


def _build(name: str, mode: str, device: torch.device, precision: str) -> tuple[Celle, CelleConfig]:
    cfg = MODELS[name]().replace(mode=mode)
    torch.manual_seed(0)
    return set_precision(Celle(cfg).to(device), precision).eval(), cfg


def run_case(case: str, args: argparse.Namespace, device: torch.device, models: dict) -> dict[str, Any]:
    name, mode, steps, batch, precision, residues = _parse_case(case)
    key = (name, mode, precision)
    if key not in models:
        models.clear()  # one model in memory at a time
        models[key] = _build(name, mode, device, precision)
    model, cfg = models[key]
    G = cfg.grid_tokens
    ar = mode == "autoregressive"
    ar_tokens = args.ar_tokens if (ar and args.ar_tokens is not None and args.ar_tokens < G) else None
    row: dict[str, Any] = {
        "case": case,
        "model": name,
        "mode": mode,
        "steps": steps if not ar else G,
        "batch": batch,
        "precision": precision,
        "residues": residues if residues is not None else cfg.max_residues,
        "depth": cfg.depth,
        "dim": cfg.dim,
        "positions": cfg.total_len,
        "parameters": model.num_parameters(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "load_before": os.getloadavg()[0],
    }
    text, nucleus = _inputs(cfg, batch, device, residues=residues)
    sampling = SamplingConfig(seed=0, steps=max(steps, 1))

    # --- FLOPs (and warm-up) -------------------------------------------------------------------
    costly = cfg.depth * cfg.total_len * batch * (steps if not ar else 1) >= _COSTLY or ar_tokens is not None
    count_batch = 1 if costly else batch
    count_steps = 1 if (costly and not ar) else steps
    count_tokens = (ar_tokens or _COUNT_AR_TOKENS) if (ar and costly) else None
    ctext, cnuc = _inputs(cfg, count_batch, device, seed=1, residues=residues)
    with _StepTimer(model, device, stop_after=count_tokens) as timer, _flop_counter() as fc:
        timer.counter = fc
        t0 = time.perf_counter()
        try:
            generate(model, text=ctext, nucleus=cnuc, sampling=SamplingConfig(seed=1, steps=max(count_steps, 1)))
        except _StopGeneration:
            pass
        count_wall = time.perf_counter() - t0
    counted = fc.get_total_flops() / count_batch
    if ar:
        prompt_f = timer.flops[0] / count_batch
        step_f = [f / count_batch for f in timer.flops[1:]]
        flops = prompt_f + sum(step_f)
        if count_tokens is not None:  # the remaining steps: attention grows linearly with the cache
            done = len(step_f)
            growth = (step_f[-1] - step_f[0]) / max(done - 1, 1)
            rest = [step_f[-1] + growth * (k + 1) for k in range(G - 1 - done)]
            flops += sum(rest)
        row.update(
            prompt_gflop=prompt_f / 1e9,
            step_gflop_mean=sum(step_f) / len(step_f) / 1e9,
            other_counted_gflop=(counted - prompt_f - sum(step_f)) / 1e9,
        )
    else:
        flops = counted * steps / count_steps
    row.update(
        gflop_per_pred=flops / 1e9,
        flops_scaled=costly,
        flops_count_batch=count_batch,
        flops_count_steps=count_steps if not ar else count_tokens,
        count_run_s=count_wall,
    )

    # --- timing --------------------------------------------------------------------------------
    runs = []
    for r in range(args.repeats):
        with _StepTimer(model, device, stop_after=ar_tokens) as timer:
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            stopped = False
            try:
                generate(model, text=text, nucleus=nucleus, sampling=sampling)
            except _StopGeneration:
                stopped = True
            _sync(device)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        run: dict[str, Any] = {"wall_s": wall, "cpu_per_wall": cpu / wall}
        if ar:
            prompt_s, step_times = timer.times[0], timer.times[1:]
            run.update(
                prompt_s=prompt_s,
                steps_timed=len(step_times),
                steps_s=sum(step_times),
                step_s_mean=sum(step_times) / len(step_times),
                step_s_first=step_times[0],
                step_s_last=step_times[-1],
                other_s=wall - prompt_s - sum(step_times),
            )
            if stopped:
                # prompt + 255 steps (last-step time for the rest: attention over a longer cache) +
                # the sampling overhead per token measured so far
                other_per_tok = run["other_s"] / (len(step_times) + 1)
                run["wall_s_extrapolated"] = (
                    prompt_s + sum(step_times) + step_times[-1] * (G - 1 - len(step_times)) + other_per_tok * G
                )
        runs.append(run)
        if r == 0 and wall > args.single_above_s:
            break  # slow cases: one timed run
    key_s = "wall_s_extrapolated" if ar_tokens is not None else "wall_s"
    best = min(runs, key=lambda x: x[key_s])
    row["runs"] = runs
    row["extrapolated"] = ar_tokens is not None
    if ar_tokens is not None:
        row["ar_tokens_timed"] = ar_tokens
    row["batch_s"] = best[key_s]
    row["s_per_pred"] = best[key_s] / batch
    row["pred_per_s"] = batch / best[key_s]
    row["gflop_s"] = row["gflop_per_pred"] * row["pred_per_s"]
    row["cpu_per_wall"] = best["cpu_per_wall"]
    if ar:
        for k in ("prompt_s", "steps_s", "step_s_mean", "step_s_first", "step_s_last", "other_s"):
            row[k] = best[k]
        row["prompt_gflop_s"] = row["prompt_gflop"] * batch / best["prompt_s"]
        row["step_gflop_s"] = row["step_gflop_mean"] * batch / best["step_s_mean"]
    if name in REFERENCE_S and ar and batch == 1 and residues is None:
        row["reference_s"] = REFERENCE_S[name]
        row["speedup_vs_reference"] = REFERENCE_S[name] / row["s_per_pred"]
    row["load_after"] = os.getloadavg()[0]
    return row


def run_tape_standin(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One BERT-base-sized encoder pass over 1002 tokens (TAPE's size), random weights."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(768, 12, 3072, dropout=0.0, activation="gelu", batch_first=True)
    enc = nn.TransformerEncoder(layer, 12, enable_nested_tensor=False).to(device).eval()
    x = torch.randn(1, 1002, 768, device=device)
    row: dict[str, Any] = {
        "case": "tape_standin",
        "model": "tape_standin",
        "mode": "embed",
        "batch": 1,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in enc.parameters()),
        "load_before": os.getloadavg()[0],
    }
    # Counted with autograd on: the inference fast path (one fused op per layer) is invisible to the counter.
    with torch.enable_grad(), _flop_counter() as fc:
        enc(x)
    with torch.inference_mode():
        enc(x)  # warm-up of the fast path timed below
        times = []
        for _ in range(args.repeats):
            _sync(device)
            t0 = time.perf_counter()
            enc(x)
            _sync(device)
            times.append(time.perf_counter() - t0)
    row.update(
        gflop_per_pred=fc.get_total_flops() / 1e9,
        s_per_pred=min(times),
        pred_per_s=1 / min(times),
        batch_s=min(times),
        runs=[{"wall_s": t} for t in times],
        extrapolated=False,
    )
    row["gflop_s"] = row["gflop_per_pred"] / row["s_per_pred"]
    # The reference re-embeds the sequence at all 256 generation steps.
    row["reference_embed_s_per_pred_est"] = 256 * row["s_per_pred"]
    row["load_after"] = os.getloadavg()[0]
    return row


NOTES = [
    "text embeddings are given (random [B, 1001, 768]); the sequence embedder runs once per prediction "
    "outside generate and is excluded from the CELL-E rows; tape_standin is a BERT-base-sized stand-in "
    "for its cost (TAPE is not installed)",
    "gflop_per_pred: FlopCounterMode (mm, bmm, addmm, scaled_dot_product_attention incl. the CPU flash "
    "kernel, full query x key products even where causal); flops_scaled rows "
    "are counted at batch 1 and, masked, one pass times the steps, autoregressive, the prompt and "
    "flops_count_steps one-token steps, the rest extrapolated",
    "reference_s: the reference implementation's seconds per prediction on this kind of machine",
    "s_per_pred marked extrapolated: prompt + --ar-tokens steps timed, the remaining steps at the last step's time",
]


def _label(r: dict[str, Any]) -> str:
    if r["mode"] == "embed":
        return "tape_standin"
    mode = "ar" if r["mode"] == "autoregressive" else f"m{r['steps']}"
    extra = "" if r.get("precision", "fp32") == "fp32" else f" {r['precision']}"
    if r.get("residues") not in (None, MODELS[r["model"]]().max_residues):
        extra += f" {r['residues']}aa"
    return f"{r['model']} {mode}{extra}"


def print_table(rows: list[dict[str, Any]], peak: float, measured: float) -> None:
    header = (
        f"{'case':<22} {'batch':>5} {'s/pred':>9} {'pred/s':>8} {'GF/pred':>9} {'GF/s':>7} "
        f"{'%190':>6} {'%meas':>6} {'vs ref':>7} {'load':>5}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        star = "*" if r.get("extrapolated") else " "
        speed = f"{r['speedup_vs_reference']:>6.1f}x" if "speedup_vs_reference" in r else f"{'':>7}"
        print(
            f"{_label(r):<22} {r['batch']:>5} {r['s_per_pred']:>8.3f}{star} {r['pred_per_s']:>8.3f} "
            f"{r['gflop_per_pred']:>9.1f} {r['gflop_s']:>7.1f} {100 * r['gflop_s'] / peak:>5.1f}% "
            f"{100 * r['gflop_s'] / measured:>5.1f}% {speed} {max(r['load_before'], r['load_after']):>5.2f}"
        )
    ar_rows = [r for r in rows if r["mode"] == "autoregressive"]
    if ar_rows:
        print()
        header = (
            f"{'autoregressive':<22} {'batch':>5} {'prompt s':>9} {'GF/s':>7} {'255 steps s':>11} "
            f"{'step ms':>8} {'GF/s':>7} {'other s':>8}"
        )
        print(header)
        print("-" * len(header))
        for r in ar_rows:
            n_steps = r["steps"] - 1
            print(
                f"{_label(r):<22} {r['batch']:>5} {r['prompt_s']:>9.3f} {r['prompt_gflop_s']:>7.1f} "
                f"{r['step_s_mean'] * n_steps:>11.3f} {1e3 * r['step_s_mean']:>8.2f} {r['step_gflop_s']:>7.1f} "
                f"{r['other_s']:>8.3f}"
            )
    if any(r.get("extrapolated") for r in rows):
        print("* extrapolated from a shortened generation (prompt + --ar-tokens steps)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cases",
        default=None,
        help=f"comma-separated model:mode:batch (mode ar or m<steps>) and/or tape_standin; default {DEFAULT_CASES}",
    )
    parser.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK_CASES}, one repeat")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per case (best kept)")
    parser.add_argument(
        "--single-above-s", type=float, default=10.0, help="cases whose first timed run takes longer are timed once"
    )
    parser.add_argument(
        "--ar-tokens",
        type=int,
        default=None,
        help="stop autoregressive generation after N threshold tokens and extrapolate",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--peak-gflops", type=float, default=190.0, help="stated fp32 matmul peak of the machine, for the %%190 column"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="output (default benchmarks/results/celle_speed.json; none with --quick)",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cases_arg = args.cases or (QUICK_CASES if args.quick else DEFAULT_CASES)
    if args.quick:
        args.repeats = 1
    cases = [c.strip() for c in cases_arg.split(",") if c.strip()]
    load_start = os.getloadavg()
    measured_peak = measure_peak(device)
    print(
        f"measured fp32 matmul peak: {measured_peak:.1f} GFLOP/s ({torch.get_num_threads()} threads); "
        f"load average {load_start[0]:.2f}",
        file=sys.stderr,
        flush=True,
    )
    rows, models = [], {}
    t_all = time.perf_counter()
    path = args.json
    if path is None and not args.quick:
        path = Path("benchmarks/results/celle_speed.json")

    def write(measured_peak_end: float | None) -> None:
        if path is None:
            return
        out = {
            "machine": {
                "cpus": os.cpu_count(),
                "threads": torch.get_num_threads(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "platform": platform.platform(),
                "device": str(device),
                "peak_gflops_stated": args.peak_gflops,
                "peak_gflops_measured_start": measured_peak,
                "peak_gflops_measured_end": measured_peak_end,
                "loadavg_start": load_start,
                "loadavg_end": os.getloadavg(),
                "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
            },
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "notes": NOTES,
            "complete": measured_peak_end is not None,
            "total_s": time.perf_counter() - t_all,
            "rows": rows,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")

    for case in cases:
        print(f"[{case}] running ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        row = run_tape_standin(args, device) if case == "tape_standin" else run_case(case, args, device, models)
        row["case_wall_s"] = time.perf_counter() - t0
        row["peak_share"] = row["gflop_s"] / args.peak_gflops
        row["measured_peak_share"] = row["gflop_s"] / measured_peak
        rows.append(row)
        print(f"[{case}] {row['s_per_pred']:.3f} s/pred ({row['case_wall_s']:.0f} s)", file=sys.stderr, flush=True)
        write(None)  # partial results survive an interrupted run
    models.clear()
    measured_peak_end = measure_peak(device)
    print_table(rows, args.peak_gflops, measured_peak)
    write(measured_peak_end)
    if path is not None:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
