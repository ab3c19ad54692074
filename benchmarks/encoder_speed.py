"""Training throughput of the protein sequence encoder: sequences/s and residues/s, float32 vs bfloat16.

Run: ``.venv/bin/python benchmarks/encoder_speed.py [--preset small] [--threads 2] [--steps 10] [--warmup 3]
[--tokens-per-batch 16384] [--json benchmarks/results/encoder_speed.json]``

A synthetic corpus of realistic lengths (lognormal, mean about 450 residues, clipped to 8..1000, random
residues; the cost does not depend on the values) is batched exactly as ``protloc train encoder`` does
(:class:`~protloc.data.sequence_data.TokenBudgetBatchSampler`, length-sorted batches of at most
``--tokens-per-batch`` padded tokens, 10% of residues masked). Each precision times ``--steps`` full
training steps (collate, forward, loss, backward, gradient clipping, AdamW) after ``--warmup`` untimed
ones, on the same batches: ``no`` in float32, ``bf16`` under ``torch.autocast("cpu", torch.bfloat16)`` (as
the trainer runs ``mixed_precision=bf16`` on a CPU). Also recorded: forward-only inference (eval mode, no
autograd) in both precisions. Residues counted are real residues (no ``<cls>``, ``<sep>`` or padding).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from protloc.data.sequence_data import ProteinDataset, TokenBudgetBatchSampler  # noqa: E402
from protloc.data.sequences import STANDARD  # noqa: E402
from protloc.data.world.compartments import WEIGHT_COLUMNS  # noqa: E402
from protloc.models.encoder import EncoderConfig, ProteinEncoder, count_parameters  # noqa: E402
from protloc.train.encoder import _param_groups  # noqa: E402


def synthetic_corpus(n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` random proteins with lognormal lengths (mean ~450, clipped to 8..1000) and one compartment each."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=np.log(450) - 0.5 * 0.6**2, sigma=0.6, size=n), 8, 1000).astype(int)
    letters = np.frombuffer(STANDARD.encode(), dtype=np.uint8)
    seqs = [rng.choice(letters, size=k).tobytes().decode() for k in lengths]
    w = np.zeros((n, len(WEIGHT_COLUMNS)))
    w[np.arange(n), rng.integers(0, len(WEIGHT_COLUMNS), size=n)] = 1.0
    df = pd.DataFrame({"accession": [f"S{i}" for i in range(n)], "human": rng.random(n) < 0.2, "sequence": seqs})
    for j, c in enumerate(WEIGHT_COLUMNS):
        df[c] = w[:, j]
    return df


def _ctx(precision: str) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def time_training(
    cfg: EncoderConfig, batches: list[list[int]], ds: ProteinDataset, precision: str, warmup: int
) -> dict:
    torch.manual_seed(0)
    model = ProteinEncoder(cfg).train()
    opt = torch.optim.AdamW(_param_groups(model, 0.01), lr=1e-3)
    seqs = residues = tokens = 0
    elapsed = 0.0
    for i, idx in enumerate(batches):
        t0 = time.perf_counter()
        batch = ds.collate(idx)
        with _ctx(precision):
            out = model.loss(batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        dt = time.perf_counter() - t0
        if i >= warmup:
            elapsed += dt
            seqs += len(idx)
            residues += int(batch["mask"].sum()) - 2 * len(idx)
            tokens += batch["ids"].numel()
    steps = len(batches) - warmup
    return {
        "sequences_per_s": seqs / elapsed,
        "residues_per_s": residues / elapsed,
        "padded_tokens_per_s": tokens / elapsed,
        "s_per_step": elapsed / steps,
        "sequences_per_step": seqs / steps,
        "padding_share": 1 - (residues + 2 * seqs) / tokens,
        "steps_timed": steps,
    }


@torch.no_grad()
def time_inference(cfg: EncoderConfig, batches: list[list[int]], ds: ProteinDataset, precision: str) -> dict:
    torch.manual_seed(0)
    model = ProteinEncoder(cfg).eval()
    seqs = residues = 0
    elapsed = 0.0
    for i, idx in enumerate(batches):
        batch = ds.collate(idx)
        t0 = time.perf_counter()
        with _ctx(precision):
            model(batch["ids"], batch["mask"])
        if i:
            elapsed += time.perf_counter() - t0
            seqs += len(idx)
            residues += int(batch["mask"].sum()) - 2 * len(idx)
    return {"sequences_per_s": seqs / elapsed, "residues_per_s": residues / elapsed}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["tiny", "small"], default="small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tokens-per-batch", type=int, default=16384)
    ap.add_argument("--precisions", default="no,bf16")
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "encoder_speed.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = getattr(EncoderConfig, args.preset)()
    ds = ProteinDataset(synthetic_corpus(4000), max_residues=cfg.max_residues, mask_prob=0.1, seed=0)
    sampler = TokenBudgetBatchSampler(ds.lengths, epoch_size=0, tokens_per_batch=args.tokens_per_batch, seed=0)
    batches = sampler.batches(0)[: args.warmup + args.steps]
    rows = {}
    for precision in args.precisions.split(","):
        train = time_training(cfg, batches, ds, precision, args.warmup)
        infer = time_inference(cfg, batches[: 1 + args.steps], ds, precision)
        rows[precision] = {"train": train, "inference": infer}
    print(
        f"protein encoder ({args.preset}, {count_parameters(ProteinEncoder(cfg)):,} parameters), "
        f"{args.threads} threads, {args.tokens_per_batch} tokens/batch"
    )
    print(
        f"{'precision':>9} {'train seq/s':>12} {'train res/s':>12} {'s/step':>7} {'seq/step':>9} "
        f"{'padding':>8} {'infer seq/s':>12} {'infer res/s':>12}"
    )
    for p, r in rows.items():
        t, i = r["train"], r["inference"]
        print(
            f"{p:>9} {t['sequences_per_s']:12.1f} {t['residues_per_s']:12.0f} {t['s_per_step']:7.2f} "
            f"{t['sequences_per_step']:9.1f} {t['padding_share']:8.1%} {i['sequences_per_s']:12.1f} "
            f"{i['residues_per_s']:12.0f}"
        )
    result = {
        "preset": args.preset,
        "parameters": count_parameters(ProteinEncoder(cfg)),
        "threads": args.threads,
        "tokens_per_batch": args.tokens_per_batch,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "results": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
