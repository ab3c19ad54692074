"""GFP constructs (CELL-E Fig. 4) and the TOP1 N-terminal truncation series (Fig. 5) with a shipped CELL-E.

Run: ``.venv/bin/python benchmarks/celle_gfp_nls.py [--run pretrained:celle-tiny] --prepared runs/p17/prepared
[--split test] [--nuclei 8] [--samples 16] [--json benchmarks/results/celle_gfp_nls.json]
[--plot benchmarks/results/celle_top1_truncation.png]``

Nuclei: the default nucleus of ``protloc predict`` (the reference nucleus centred in a training-size
field) and ``--nuclei`` nucleus images of held-out crops (``--split``, the proteome world's test
partition), one crop per protein, proteins evenly spaced through the split. Every construct is predicted
against every nucleus ``--samples`` times with the same sampling noise (common random numbers), so a
difference between constructs on one nucleus comes from the sequence alone.

Constructs (``engineered.fasta``; peptides appended to the GFP C terminus, no linker): GFP, GFP + the
nucleoplasmin NLS (KRPAATKKAGQAKKKK), GFP + the N-Myc NLS as printed in the paper (PAAKRVKLD), GFP + a
random 16-residue peptide, and GFP + a **scrambled nucleoplasmin NLS** made here: the same 16 residues in
the first seeded permutation (``numpy`` ``default_rng(seed)``, permutations drawn in turn) with no run of
three or more consecutive K/R, so that no classic basic cluster survives.

Criteria (issue 17): GFP + nucleoplasmin NLS raises the map's nucleus proportion over GFP by >= 0.15 on
the default nucleus and on every held-out nucleus; the random peptide moves it by < 0.03 (mean over
nuclei); the scrambled NLS is reported. TOP1 (765 aa) loses 25 residues at a time from its N terminus
(down to 100 residues); the model reads the first ``max_residues`` residues of each variant, so the plot
shows the nucleus proportion against the residues deleted, with the four N-terminal NLS motifs the
paper quotes (aa 59-65, 150-156, 175-180, 193-199) marked.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from protloc.analysis.screens import construct_experiment, predict_variants, truncation_series
from protloc.commands.inputs import model_nucleus
from protloc.data.datasets import CelleDataset
from protloc.data.sequences import read_sequences
from protloc.data.world.assets import load_engineered_records
from protloc.eval.load import load_celle_run
from protloc.eval.predict import SamplingConfig
from protloc.pretrained import resolve_checkpoint

CONSTRUCTS = ("GFP", "GFP_NLS_nucleoplasmin", "GFP_NLS_NMyc", "GFP_random_peptide")
SCRAMBLED = "GFP_NLS_scrambled"
TOP1_MOTIFS = ((59, 65), (150, 156), (175, 180), (193, 199))


def scrambled(peptide: str, seed: int) -> tuple[str, int]:
    """The first seeded permutation of ``peptide`` without three consecutive K/R (and its draw number)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list(peptide))
    for draw in range(1, 100_000):
        cand = "".join(letters[rng.permutation(letters.size)])
        basic = [c in "KR" for c in cand]
        if not any(all(basic[i : i + 3]) for i in range(len(cand) - 2)) and cand != peptide:
            return cand, draw
    raise RuntimeError(f"no permutation of {peptide} without a K/R triplet")


def held_out_nuclei(
    prepared: Path, split: str, n: int, image_size: int, max_residues: int
) -> tuple[torch.Tensor, list]:
    """One crop per protein, proteins evenly spaced through the split (deterministic)."""
    ds = CelleDataset(
        prepared / "celle.zarr",
        split=split,
        sequences=read_sequences(prepared / "sequences.fasta"),
        image_size=image_size,
        max_residues=max_residues,
    )
    first: dict[str, int] = {}
    for i, p in enumerate(ds.protein_ids):
        first.setdefault(str(p), i)
    proteins = sorted(first)
    picks = [proteins[int(j)] for j in np.linspace(0, len(proteins) - 1, n).round().astype(int)]
    images = torch.stack([ds[first[p]]["nucleus"] for p in picks]).float()
    return images, [{"protein_id": p, "store_index": int(ds.crop_index[first[p]])} for p in picks]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="pretrained:celle-tiny")
    ap.add_argument("--prepared", type=Path, required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--nuclei", type=int, default=8)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--truncate-step", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/celle_gfp_nls.json"))
    ap.add_argument("--plot", type=Path, default=Path("benchmarks/results/celle_top1_truncation.png"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    checkpoint = resolve_checkpoint(args.run)
    run = load_celle_run(checkpoint)
    c = run.model.config
    records = {r["id"]: r for r in load_engineered_records()}
    seqs = {k: records[k]["sequence"] for k in CONSTRUCTS}
    peptide = records["GFP_NLS_nucleoplasmin"]["peptide"]
    assert seqs["GFP_NLS_nucleoplasmin"] == seqs["GFP"] + peptide  # C-terminal fusion, no linker
    scr, draw = scrambled(peptide, args.seed)
    seqs[SCRAMBLED] = seqs["GFP"] + scr

    default = torch.as_tensor(np.asarray(model_nucleus(run, None)[0]), dtype=torch.float32)[None, None]
    held, provenance = held_out_nuclei(args.prepared, args.split, args.nuclei, run.image_size, c.max_residues)
    nuclei = torch.cat([default, held])
    names = ["default (protloc predict)"] + [f"{p['protein_id']} ({args.split})" for p in provenance]
    sampling = SamplingConfig(samples=args.samples, seed=args.seed)
    per_image, summary = construct_experiment(run, seqs, nuclei, sampling=sampling, progress=True)
    wide = per_image.pivot(index="image", columns="construct", values="nucleus_proportion")[list(seqs)]
    delta = wide.sub(wide["GFP"], axis=0)

    rows = []
    for r in summary.to_dict(orient="records"):
        name = r["construct"]
        d = delta[name].to_numpy()
        rows.append(
            {
                "construct": name,
                "length": r["length"],
                "peptide": scr if name == SCRAMBLED else records[name].get("peptide", ""),
                "nucleus_proportion_mean": r["nucleus_proportion"],
                "nucleus_proportion_sd": r["nucleus_proportion_sd"],
                "delta_default_nucleus": float(d[0]),
                "delta_held_out_mean": float(d[1:].mean()),
                "delta_min": float(d.min()),
                "delta_max_abs": float(np.abs(d).max()),
                "above_gfp": int((d > 0).sum()) if name != "GFP" else 0,
            }
        )
    nls = delta["GFP_NLS_nucleoplasmin"].to_numpy()
    rnd = delta["GFP_random_peptide"].to_numpy()
    criteria = {
        "nls_raises_every_nucleus": bool((nls >= 0.15).all()),
        "nls_min_delta": float(nls.min()),
        "random_peptide_small": bool(abs(rnd.mean()) < 0.03),
        "random_peptide_mean_delta": float(rnd.mean()),
        "scrambled_nls_mean_delta": float(delta[SCRAMBLED].mean()),
    }
    print(f"\n== GFP constructs: {len(nuclei)} nuclei x {args.samples} samples ({checkpoint}) ==")
    print(f"{'construct':<24} {'aa':>4} {'nucleus prop.':>16} {'delta default':>14} {'delta held-out':>15} {'min':>7}")
    for r in rows:
        print(
            f"{r['construct']:<24} {r['length']:>4} {r['nucleus_proportion_mean']:>8.3f} +- "
            f"{r['nucleus_proportion_sd']:.3f} {r['delta_default_nucleus']:>+14.3f} {r['delta_held_out_mean']:>+15.3f} "
            f"{r['delta_min']:>+7.3f}"
        )
    print(json.dumps(criteria, indent=1))

    # ---- TOP1 N-terminal truncations (Fig. 5)
    top1 = records["TOP1"]["sequence"]
    variants = truncation_series(
        top1, step=args.truncate_step, from_="n", min_length=max(100, args.truncate_step), seq_name="TOP1"
    )
    tables = [predict_variants(run, variants, nuclei[j : j + 1], sampling=sampling) for j in range(len(nuclei))]
    props = np.stack([t["nucleus_proportion"].to_numpy() for t in tables])  # [nuclei, variants]
    deleted = np.array([0] + [args.truncate_step * k for k in range(1, len(variants))])
    series = pd.DataFrame(
        {
            "variant": [v.name for v in variants],
            "deleted_n_terminal": deleted,
            "residues_seen": [f"{d + 1}-{min(d + c.max_residues, len(top1))}" for d in deleted],
            "nucleus_proportion_mean": props.mean(0),
            "nucleus_proportion_sd": props.std(0, ddof=1) if len(nuclei) > 1 else np.zeros(len(variants)),
        }
    )
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.errorbar(
        series["deleted_n_terminal"],
        series["nucleus_proportion_mean"],
        yerr=series["nucleus_proportion_sd"],
        marker="o",
        ms=3,
        capsize=2,
        color="#1f77b4",
    )
    for lo, hi in TOP1_MOTIFS:
        ax.axvspan(lo - 1, hi, color="#d62728", alpha=0.2, lw=0)
    ax.set_xlabel("N-terminal residues of TOP1 deleted (red: the paper's NLS motifs)")
    ax.set_ylabel("predicted nucleus proportion")
    ax.set_title(
        f"TOP1 truncation series, {len(nuclei)} nuclei x {args.samples} samples (mean +- sd over nuclei)", fontsize=9
    )
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)

    out = {
        "run": str(args.run),
        "checkpoint": str(checkpoint),
        "step": run.extra.get("step"),
        "max_residues": c.max_residues,
        "samples": args.samples,
        "seed": args.seed,
        "nuclei": names,
        "held_out_nuclei": provenance,
        "scrambled_nls": {
            "peptide": scr,
            "sequence": seqs[SCRAMBLED],
            "draw": draw,
            "rule": "first seeded permutation of the nucleoplasmin NLS with no K/R triplet",
        },
        "rows": rows,
        "criteria": criteria,
        "per_nucleus": {name: wide[name].tolist() for name in wide.columns},
        "top1_truncation": series.to_dict(orient="records"),
        "plot": str(args.plot),
        "seconds": time.perf_counter() - t0,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json} and {args.plot} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
