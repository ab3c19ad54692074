"""CELL-E on proteins it has never seen: every model and baseline on the same held-out crops, one run.

Run after the four CELL-E runs of issue 17 (see the README's "CELL-E on held-out proteins" section for the
commands that made them):
``.venv/bin/python benchmarks/celle_eval.py --prepared runs/p17/prepared --world runs/p17/world
--runs runs/p17/celle [--split test] [--max-crops 1600] [--json benchmarks/results/celle_eval.json]``

The crops are those of the held-out ``--split`` (the homology partition's test proteins of a ``proteome``
world: no protein of it, and no protein homologous to one of it, was trained on), drawn once with random
crops and flips that are the same for every row (paper S.3.7). Rows:

- ``CELL-E + encoder``: the autoregressive CELL-E on the frozen per-residue vectors of the shipped protein
  encoder (``pretrained:encoder-small``);
- ``CELL-E 2 masked + encoder``: the same with masked (bidirectional, cosine-schedule) decoding;
- ``CELL-E one-hot``: the paper's one-hot ablation;
- ``no sequence``: the paper's "no sequence" ablation (every sequence replaced by padding);
- ``composition ridge``: ridge regression of the nucleus proportion on amino-acid + dipeptide composition;
- ``encoder localize``: the encoder's own sequence-only call (its 13 presence and 12 distribution
  probabilities, mapped to the nucleus proportion by a ridge fitted on the train partition's crops; its
  compartment is the argmax of its distribution head) -- how much of what it knows survives into images;
- ``VQGAN ceiling``: the target threshold images through the threshold VQGAN.

The four CELL-E runs trained on the same data (the train partition) for the same number of steps, and
each checkpoint was chosen on the val partition. Columns: nucleus-proportion accuracy, nuclear-call
accuracy (> 50% rule), threshold pixel accuracy, SSIM and **compartment agreement**: a CNN trained here on
real threshold crops of the train partition (:mod:`protloc.eval.compartments`) names the compartment of
each image; its agreement with the protein's label (argmax of its GO-derived weights) on the generated
images, next to its agreement on the real test images (``real images``, its ceiling). Everything is mean
over proteins (each protein counts once), then per compartment. Prints markdown tables and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from protloc.data.io import read_table
from protloc.data.sequences import read_sequences
from protloc.data.world.compartments import COMPARTMENTS, WEIGHT_COLUMNS
from protloc.eval.compartments import (
    CompartmentClassifier,
    agreement_table,
    classify,
    train_compartment_classifier,
)
from protloc.eval.evaluate import EvaluationResult, evaluate_celle, format_table, sequence_baseline, vqgan_ceiling
from protloc.eval.load import load_celle_run
from protloc.eval.localize import encoder_outputs, load_encoder

RUNS = {
    "CELL-E + encoder": "enc_ar",
    "CELL-E 2 masked + encoder": "enc_masked",
    "CELL-E one-hot": "onehot",
    "no sequence": "noseq",
}
COLUMNS = (
    "nucleus_proportion_accuracy",
    "nuclear_localization_correct",
    "threshold_pixel_accuracy",
    "ssim",
    "compartment_agreement",
)
LABELS = {
    "nucleus_proportion_accuracy": "nucleus-proportion acc.",
    "nuclear_localization_correct": "nuclear call acc.",
    "threshold_pixel_accuracy": "threshold pixel acc.",
    "ssim": "SSIM",
    "compartment_agreement": "compartment agreement",
}


def _onehot(pred: np.ndarray) -> np.ndarray:
    return np.eye(len(COMPARTMENTS))[np.asarray(pred)]


def _with_agreement(
    result: EvaluationResult | pd.DataFrame, predicted: np.ndarray, labels: dict[str, str]
) -> EvaluationResult:
    """``result`` (or a bare per-image id table) with a per-image ``compartment_agreement`` column."""
    per_image = (result if isinstance(result, pd.DataFrame) else result.per_image).copy()
    truth = np.array([COMPARTMENTS.index(labels[p]) for p in per_image["protein_id"].astype(str)])
    per_image["compartment_agreement"] = (np.asarray(predicted) == truth).astype(np.float64)
    info = {"name": "real images"} if isinstance(result, pd.DataFrame) else result.info
    return EvaluationResult.from_per_image(per_image, info=info)


def _per_compartment(results: dict[str, EvaluationResult], labels: dict[str, str]) -> pd.DataFrame:
    """Mean over each compartment's proteins of every row's per-protein metrics."""
    frames = []
    for name, res in results.items():
        pp = res.per_protein.copy()
        pp["compartment"] = [labels[str(p)] for p in pp.index]
        cols = [c for c in ("nucleus_proportion_accuracy", "compartment_agreement") if c in pp]
        g = pp.groupby("compartment")[cols].mean()
        g.columns = [f"{name}: {c}" for c in cols]
        frames.append(g)
    out = pd.concat(frames, axis=1)
    any_pp = next(iter(results.values())).per_protein
    counts = pd.Series([labels[str(p)] for p in any_pp.index]).value_counts()
    out.insert(0, "proteins", counts.reindex(out.index).fillna(0).astype(int))
    return out.reindex([c for c in COMPARTMENTS if c in out.index])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepared", type=Path, required=True, help="protloc prepare output of a proteome world")
    ap.add_argument("--world", type=Path, required=True, help="the world folder (truth.csv: labels and weights)")
    ap.add_argument("--runs", type=Path, required=True, help="folder holding enc_ar, enc_masked, onehot, noseq")
    ap.add_argument("--encoder", default="pretrained:encoder-small")
    ap.add_argument("--split", default="test")
    ap.add_argument("--max-crops", type=int, default=1600)
    ap.add_argument("--classifier-epochs", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=64, help="the CELL-E runs' image size")
    ap.add_argument(
        "--classifier",
        type=Path,
        default=None,
        help="save the compartment classifier here (.pt), or reuse it if it exists (same store and settings)",
    )
    ap.add_argument("--classifier-only", action="store_true", help="train (or load) the classifier and stop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/celle_eval.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    store = args.prepared / "celle.zarr"
    seqs = read_sequences(args.prepared / "sequences.fasta")
    truth = read_table(args.world / "truth.csv")
    truth = truth[~truth["engineered"].astype(str).str.lower().isin(("true", "1"))]
    labels = dict(zip(truth["protein_id"].astype(str), truth["label"].astype(str), strict=True))
    weights = {
        str(p): np.asarray(w, dtype=np.float64)
        for p, w in zip(truth["protein_id"], truth[list(WEIGHT_COLUMNS)].to_numpy(), strict=True)
    }
    common = dict(sequences=seqs, split=args.split, max_crops=args.max_crops, seed=args.seed, progress=True)
    timings: dict[str, float] = {}

    # ---- the compartment classifier, on real crops of the train partition (val for its epochs' record)
    t = time.perf_counter()
    if args.classifier and args.classifier.with_suffix(".pt").is_file():
        # a classifier trained by an earlier call with the same store and settings (see --classifier)
        saved = torch.load(args.classifier.with_suffix(".pt"), weights_only=False)
        classifier = CompartmentClassifier()
        classifier.load_state_dict(saved["state_dict"])
        classifier.eval()
        clf_info = {**saved["info"], "reused_from": str(args.classifier.with_suffix(".pt"))}
    else:
        classifier, clf_info = train_compartment_classifier(
            store,
            labels=labels,
            weights=weights,
            split="train",
            val_split="val",
            image_size=args.image_size,
            epochs=args.classifier_epochs,
            seed=args.seed,
        )
        if args.classifier:
            args.classifier.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"state_dict": classifier.state_dict(), "info": clf_info}, args.classifier.with_suffix(".pt"))
    if args.classifier_only:
        print(json.dumps({k: v for k, v in clf_info.items() if k != "class_counts"}, indent=1, default=str))
        return
    timings["classifier"] = time.perf_counter() - t
    runs = {name: load_celle_run(args.runs / folder) for name, folder in RUNS.items()}
    first = next(iter(runs.values()))
    if first.image_size != args.image_size:
        raise SystemExit(f"the CELL-E runs see {first.image_size} px images, the classifier {args.image_size} px")

    results: dict[str, EvaluationResult] = {}
    # ---- real images (the classifier's ceiling) and the VQGAN ceiling, same crops
    t = time.perf_counter()
    ceiling = vqgan_ceiling(first, store, batch_size=32, keep_images=True, **common)
    img = ceiling.images
    assert img is not None
    real_pred = classify(classifier, img["nucleus"], img["target"]).argmax(1)
    vq_pred = classify(classifier, img["nucleus"], img["pred_threshold"]).argmax(1)
    real = ceiling.per_image[["protein_id", "index", "view"]].reset_index(drop=True)
    results["real images"] = _with_agreement(real, real_pred, labels)
    results["VQGAN ceiling"] = _with_agreement(ceiling, vq_pred, labels)
    agreement = {"real images": agreement_table(_onehot(real_pred), list(ceiling.per_image["protein_id"]), labels)}
    timings["ceiling"] = time.perf_counter() - t

    # ---- the CELL-E rows
    steps = {}
    for name, run in runs.items():
        t = time.perf_counter()
        res = evaluate_celle(run, store, batch_size=32, keep_images=True, **common)
        assert res.images is not None
        pred = classify(classifier, res.images["nucleus"], res.images["pred_threshold"]).argmax(1)
        results[name] = _with_agreement(res, pred, labels)
        agreement[name] = agreement_table(_onehot(pred), list(res.per_image["protein_id"]), labels)
        steps[name] = {"checkpoint": str(run.checkpoint), "step": run.extra.get("step")}
        timings[name] = time.perf_counter() - t

    # ---- sequence-only rows
    t = time.perf_counter()
    results["composition ridge"] = sequence_baseline(store, image_size=first.image_size, **common)
    timings["composition ridge"] = time.perf_counter() - t
    t = time.perf_counter()
    encoder, _ = load_encoder(args.encoder)
    cache: dict[str, np.ndarray] = {}

    def encoder_features(batch: list[str]) -> np.ndarray:
        todo = [s for s in dict.fromkeys(batch) if s not in cache]
        if todo:
            out = encoder_outputs(encoder, todo, batch_size=32)
            for i, s in enumerate(todo):
                cache[s] = np.concatenate([out["presence"][i], out["distribution"][i]])
        return np.stack([cache[s] for s in batch])

    enc = sequence_baseline(
        store,
        image_size=first.image_size,
        features=encoder_features,
        features_name=f"{args.encoder}: presence (13) + distribution (12) probabilities",
        **common,
    )
    pids = enc.per_image["protein_id"].astype(str).tolist()
    call = np.array([int(np.argmax(encoder_features([seqs[p]])[0, 13:])) for p in pids])
    results["encoder localize"] = _with_agreement(enc, call, labels)
    agreement["encoder localize"] = agreement_table(_onehot(call), pids, labels)
    timings["encoder localize"] = time.perf_counter() - t

    order = [
        *RUNS,
        "composition ridge",
        "encoder localize",
        "VQGAN ceiling",
        "real images",
    ]
    results = {k: results[k] for k in order}
    seconds = time.perf_counter() - t0
    n_prot = results["CELL-E + encoder"].per_protein.shape[0]
    n_img = len(results["CELL-E + encoder"].per_image)
    print(f"\n== held-out split {args.split!r}: {n_prot} proteins, {n_img} crops (mean +- sd over proteins) ==")
    print(format_table(results, metrics=list(COLUMNS)).replace("compartment_agreement", "compartment agreement"))
    ceiling_agree = results["real images"].table["compartment_agreement"][0]
    vs_ceiling = {
        k: r.table["compartment_agreement"][0] / ceiling_agree
        for k, r in results.items()
        if "compartment_agreement" in r.table and ceiling_agree > 0
    }
    print(
        "compartment agreement as a share of its ceiling (real images): "
        + ", ".join(f"{k} {v:.2f}" for k, v in vs_ceiling.items() if k != "real images")
    )
    per_comp = _per_compartment(results, labels)
    print("== per compartment (mean over the compartment's proteins) ==")
    show = per_comp[["proteins", *[c for c in per_comp.columns if c.endswith("compartment_agreement")]]]
    show.columns = ["proteins", *[c.split(":")[0] for c in show.columns[1:]]]
    print(show.round(3).to_string())

    out = {
        "prepared": str(args.prepared),
        "world": str(args.world),
        "split": args.split,
        "max_crops": args.max_crops,
        "seed": args.seed,
        "proteins": n_prot,
        "crops": n_img,
        "runs": steps,
        "encoder": args.encoder,
        "classifier": {k: v for k, v in clf_info.items() if isinstance(v, int | float | str | list | dict)},
        "seconds": seconds,
        "timings": timings,
        "columns": {c: LABELS[c] for c in COLUMNS},
        "over_proteins": {k: v.table for k, v in results.items()},
        "over_images": {k: v.table_images for k, v in results.items()},
        "compartment_agreement_vs_ceiling": vs_ceiling,
        "per_compartment": json.loads(per_comp.to_json(orient="index")),
        "agreement": agreement,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2, default=float) + "\n")
    print(f"wrote {args.json} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
