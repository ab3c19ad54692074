"""How much bf16 / int8 prediction changes a trained CELL-E's outputs (``protloc predict --precision``).

Run after ``benchmarks/celle_quality.py``: ``.venv/bin/python benchmarks/celle_precision.py
[--run runs/celle/bench300/celle] [--prepared runs/celle/prepared] [--crops 64]
[--json benchmarks/results/celle_precision.json]``

Predicts the held-out crops (evenly spaced through the validation split: their sequences and nucleus
images) with the same seed in fp32, bf16 and int8, and compares each reduced precision with fp32:

- ``token_agreement``: share of threshold tokens sampled identically (the same Gumbel noise; a token
  flips only where the change in logits reorders the noisy top candidates, and every later token of an
  autoregressive sample then sees a different prefix);
- ``map_tv``: total-variation distance between the Eq. 3 probability maps (half the L1 distance of the
  normalised maps; 0 = identical, 1 = disjoint);
- ``nucleus_proportion_abs_diff``: mean and max ``|delta|`` of the nucleus proportion.

Differences between two fp32 runs with different seeds are reported beside them as the scale of
sampling noise.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from protloc.data.datasets import CelleDataset
from protloc.data.sequences import read_sequences
from protloc.eval.load import load_celle_run
from protloc.eval.predict import SamplingConfig, predict


def _predict(run, seqs, nuclei, seed: int, batch: int) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {"tokens": [], "probability": [], "nucleus_proportion": []}
    for i in range(0, len(seqs), batch):
        r = predict(run, seqs[i : i + batch], nuclei[i : i + batch], sampling=SamplingConfig(seed=seed + i))
        for k in out:
            out[k].append(r[k].float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def _compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    tv = 0.5 * (a["probability"] - b["probability"]).abs().flatten(1).sum(1)
    dp = (a["nucleus_proportion"] - b["nucleus_proportion"]).abs()
    return {
        "token_agreement": float((a["tokens"] == b["tokens"]).float().mean()),
        "map_tv_mean": float(tv.mean()),
        "nucleus_proportion_abs_diff_mean": float(dp.mean()),
        "nucleus_proportion_abs_diff_max": float(dp.max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/celle/bench300/celle"))
    ap.add_argument("--prepared", type=Path, default=Path("runs/celle/prepared"))
    ap.add_argument("--crops", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/celle_precision.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    runs = {p: load_celle_run(args.run, precision=p) for p in ("fp32", "bf16", "int8")}
    c = runs["fp32"].model.config
    all_seqs = read_sequences(args.prepared / "sequences.fasta")
    val = CelleDataset(
        args.prepared / "celle.zarr",
        split="val",
        sequences=all_seqs,
        image_size=runs["fp32"].image_size,
        max_residues=c.max_residues,
    )
    picks = np.linspace(0, len(val) - 1, args.crops).astype(int)
    items = [val[int(i)] for i in picks]
    seqs = [all_seqs[it["protein_id"]] for it in items]
    nuclei = torch.stack([it["nucleus"] for it in items])
    results = {p: _predict(r, seqs, nuclei, 0, args.batch) for p, r in runs.items()}
    reseeded = _predict(runs["fp32"], seqs, nuclei, 10_000, args.batch)
    rows = {p: _compare(results[p], results["fp32"]) for p in ("bf16", "int8")}
    rows["fp32, another seed"] = _compare(reseeded, results["fp32"])
    print(f"{'vs fp32 (same seed)':<22} {'tokens same':>12} {'map TV':>8} {'|d nuc prop| mean':>18} {'max':>7}")
    for name, r in rows.items():
        diff = f"{r['nucleus_proportion_abs_diff_mean']:>18.4f} {r['nucleus_proportion_abs_diff_max']:>7.4f}"
        print(f"{name:<22} {r['token_agreement']:>12.3f} {r['map_tv_mean']:>8.4f} {diff}")
    out = {
        "run": str(args.run),
        "step": runs["fp32"].extra.get("step"),
        "crops": args.crops,
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
