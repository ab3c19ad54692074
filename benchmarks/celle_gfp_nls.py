"""GFP vs GFP + NLS (paper Fig. 4): predicted nucleus proportion of the engineered constructs.

Run after ``benchmarks/celle_quality.py``: ``.venv/bin/python benchmarks/celle_gfp_nls.py
[--run runs/celle/bench300/celle] [--prepared runs/celle/prepared] [--nuclei 8] [--samples 8]
[--json benchmarks/results/celle_gfp_nls.json]``

The constructs shipped with the reference world (``engineered.fasta``: avGFP, GFP + the nucleoplasmin
NLS, GFP + the N-Myc NLS, GFP + a random 16-residue peptide, all C-terminal) are predicted by a trained
CELL-E against ``--nuclei`` nucleus images of held-out crops (evenly spaced through the validation split),
``--samples`` draws each, with the same sampling noise for every construct (common random numbers, as
``protloc screen`` does). Reported per construct: the nucleus proportion of the Eq. 3 probability map,
mean +- sd over the nucleus images, and its difference from GFP (mean +- sd over the images, and how
many images the construct is above GFP on). The paper shows the NLS raising GFP's nucleus proportion;
the random peptide is the control. A construct longer than the model's window would lose its
C-terminal peptide: the script refuses such a model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from protloc.analysis.screens import construct_experiment
from protloc.data.datasets import CelleDataset
from protloc.data.sequences import read_sequences
from protloc.data.world.assets import load_engineered_records
from protloc.eval.load import load_celle_run
from protloc.eval.predict import SamplingConfig

CONSTRUCTS = ("GFP", "GFP_NLS_nucleoplasmin", "GFP_NLS_NMyc", "GFP_random_peptide")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/celle/bench300/celle"))
    ap.add_argument("--prepared", type=Path, default=Path("runs/celle/prepared"))
    ap.add_argument("--nuclei", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/celle_gfp_nls.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    run = load_celle_run(args.run)
    c = run.model.config
    records = {r["id"]: r for r in load_engineered_records()}
    seqs = {k: records[k]["sequence"] for k in CONSTRUCTS}
    store = args.prepared / "celle.zarr"
    val = CelleDataset(
        store,
        split="val",
        sequences=read_sequences(args.prepared / "sequences.fasta"),
        image_size=run.image_size,
        max_residues=c.max_residues,
    )
    picks = np.linspace(0, len(val) - 1, args.nuclei).astype(int)
    nuclei = torch.stack([val[int(i)]["nucleus"] for i in picks]).float()
    sampling = SamplingConfig(samples=args.samples, seed=args.seed)
    per_image, summary = construct_experiment(run, seqs, nuclei, sampling=sampling)
    wide = per_image.pivot(index="image", columns="construct", values="nucleus_proportion")
    props = wide[list(CONSTRUCTS)].to_numpy()
    rows = []
    for r in summary.to_dict(orient="records"):
        name = r["construct"]
        rows.append(
            {
                "construct": name,
                "length": r["length"],
                "peptide": records[name].get("peptide", ""),
                "nucleus_proportion_mean": r["nucleus_proportion"],
                "nucleus_proportion_sd": r["nucleus_proportion_sd"] if args.nuclei > 1 else 0.0,
                "delta_vs_gfp_mean": r["delta"],
                "delta_vs_gfp_sd": r["delta_sd"] if args.nuclei > 1 else 0.0,
                "above_gfp": r["above_reference"],
            }
        )
    print(f"{'construct':<24} {'aa':>4} {'nucleus proportion':>20} {'delta vs GFP':>18} {'above GFP':>10}")
    for r in rows:
        print(
            f"{r['construct']:<24} {r['length']:>4} {r['nucleus_proportion_mean']:>10.3f} +- "
            f"{r['nucleus_proportion_sd']:.3f} {r['delta_vs_gfp_mean']:>+9.3f} +- {r['delta_vs_gfp_sd']:.3f} "
            f"{r['above_gfp']:>5}/{args.nuclei}"
        )
    out = {
        "run": str(args.run),
        "step": run.extra.get("step"),
        "max_residues": c.max_residues,
        "nuclei": [int(i) for i in picks],
        "samples": args.samples,
        "seed": args.seed,
        "rows": rows,
        "per_nucleus": props.tolist(),
        "seconds": time.perf_counter() - t0,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
