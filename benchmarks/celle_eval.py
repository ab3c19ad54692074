"""CELL-E prediction quality on held-out proteins beside the VQGAN ceiling and a sequence-only baseline.

Run after ``benchmarks/celle_quality.py`` (which trains the models):
``.venv/bin/python benchmarks/celle_eval.py [--prepared runs/celle/prepared] [--runs runs/celle/bench]
[--max-crops 400] [--json benchmarks/results/celle_eval.json]``

Evaluates, on the same held-out crops with the same random crops and flips for every row (paper
S.3.7), one prediction per crop of the ``tiny`` CELL-E, of its "no sequence" ablation, the threshold
VQGAN's reconstructions (the ceiling, Table S.2) and a ridge regression of the nucleus proportion on
amino-acid and dipeptide composition (a sequence-only baseline, trained on the training proteins in
the same run). Prints a markdown table (mean +- sd over proteins) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from protloc.data.sequences import read_sequences
from protloc.eval.evaluate import evaluate_celle, format_table, sequence_baseline, vqgan_ceiling
from protloc.eval.load import load_celle_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepared", type=Path, default=Path("runs/celle/prepared"))
    ap.add_argument("--runs", type=Path, default=Path("runs/celle/bench"))
    ap.add_argument("--celle", type=Path, default=None, help="the sequence model's run (default RUNS/celle)")
    ap.add_argument(
        "--no-sequence", type=Path, default=None, help="the ablation's run (default RUNS/celle_no_sequence)"
    )
    ap.add_argument("--max-crops", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/celle_eval.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    store = args.prepared / "celle.zarr"
    seqs = read_sequences(args.prepared / "sequences.fasta")
    common = dict(sequences=seqs, max_crops=args.max_crops, seed=args.seed, progress=True)
    t0 = time.perf_counter()
    run = load_celle_run(args.celle or args.runs / "celle")
    results = {
        "VQGAN ceiling": vqgan_ceiling(run, store, batch_size=32, **common),
        "CELL-E tiny": evaluate_celle(run, store, batch_size=32, **common),
        "CELL-E tiny, no sequence": evaluate_celle(
            load_celle_run(args.no_sequence or args.runs / "celle_no_sequence"), store, batch_size=32, **common
        ),
        "sequence-only ridge": sequence_baseline(store, image_size=run.image_size, **common),
    }
    seconds = time.perf_counter() - t0
    print(format_table(results))
    out = {
        "prepared": str(args.prepared),
        "celle": str(args.celle or args.runs / "celle"),
        "no_sequence": str(args.no_sequence or args.runs / "celle_no_sequence"),
        "max_crops": args.max_crops,
        "seed": args.seed,
        "seconds": seconds,
        "over_proteins": {k: v.table for k, v in results.items()},
        "over_images": {k: v.table_images for k, v in results.items()},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
