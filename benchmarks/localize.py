"""Sequence-only localization on held-out human proteins: the shipped encoder against its baselines.

Run: ``.venv/bin/python benchmarks/localize.py [--encoder pretrained:encoder-small]
[--human-only RUN_OR_CHECKPOINT] [--json benchmarks/results/localize.json]``

In one run, on the shipped human proteome table (``protloc.data.proteome``) and its homology
partition (components of the >= 30%-identity graph, so no test protein has a homolog in training):

- rows: the shipped encoder; logistic regression on amino-acid + dipeptide composition fitted on the
  human train partition (its C chosen on val); optionally the same encoder architecture trained on the
  human train partition alone (``--human-only``: what the other species' proteins add);
- columns, on the test partition: per-compartment AUROC and MCC, macro AUROC / MCC / F1 over the 12
  compartments (thresholds that maximise MCC on the val partition, applied unchanged to test), and
  nuclear vs non-nuclear accuracy (val-chosen threshold) and AUROC;
- the engineered constructs (CELL-E Fig. 4): nuclear probability of GFP, GFP + nucleoplasmin NLS,
  GFP + N-Myc NLS and GFP + a random peptide, and where each construct's importance track peaks;
- speed: proteins/s of ``localize`` over the whole human table (no importance tracks), and training
  residues/s from the encoder's recipe when recorded there.

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from itertools import product
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from protloc.data.proteome import PRESENCE_NAMES, compartment_targets, read_human_table
from protloc.data.sequences import STANDARD
from protloc.data.world.compartments import COMPARTMENTS
from protloc.eval.localization import auroc_or_nan, choose_thresholds, multilabel_scores

NUC = PRESENCE_NAMES.index("nucleus")
_DIPEPTIDES = {a + b: i for i, (a, b) in enumerate(product(STANDARD, STANDARD))}
_AA = {a: i for i, a in enumerate(STANDARD)}


def composition(seqs: list[str]) -> np.ndarray:
    """Amino-acid (20) and dipeptide (400) frequencies per sequence."""
    out = np.zeros((len(seqs), 420), dtype=np.float32)
    for i, s in enumerate(seqs):
        for ch in s:
            j = _AA.get(ch)
            if j is not None:
                out[i, j] += 1
        for k in range(len(s) - 1):
            j = _DIPEPTIDES.get(s[k : k + 2])
            if j is not None:
                out[i, 20 + j] += 1
        out[i, :20] /= max(len(s), 1)
        out[i, 20:] /= max(len(s) - 1, 1)
    return out


def composition_baseline(seqs: dict[str, list[str]], y: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-target logistic regression on composition; C picked on val by macro AUROC."""
    x = {k: composition(v) for k, v in seqs.items()}
    scaler = StandardScaler().fit(x["train"])
    x = {k: scaler.transform(v) for k, v in x.items()}
    best, best_c = -1.0, None
    for c in (0.001, 0.01, 0.1):
        p = _fit_predict(x, y, c)
        score = np.nanmean([auroc_or_nan(y["val"][:, j], p["val"][:, j]) for j in range(y["val"].shape[1])])
        if score > best:
            best, best_c, out = score, c, p
    print(f"composition: C={best_c} (val macro AUROC {best:.3f})")
    return out


def _fit_predict(x: dict[str, np.ndarray], y: dict[str, np.ndarray], c: float) -> dict[str, np.ndarray]:
    preds = {k: np.zeros((len(v), y["train"].shape[1])) for k, v in x.items()}
    for j in range(y["train"].shape[1]):
        clf = LogisticRegression(C=c, max_iter=2000).fit(x["train"], y["train"][:, j])
        for k in preds:
            preds[k][:, j] = clf.predict_proba(x[k])[:, 1]
    return preds


def encoder_predictions(checkpoint: str, seqs: dict[str, list[str]]) -> tuple[dict[str, np.ndarray], float]:
    """Presence probabilities of an encoder per split, and its proteins/s over all of them."""
    from protloc.eval.localize import load_encoder, presence_probabilities

    model, _ = load_encoder(checkpoint)
    out, n, t0 = {}, 0, time.perf_counter()
    for k, v in seqs.items():
        out[k] = presence_probabilities(model, v)
        n += len(v)
    return out, n / (time.perf_counter() - t0)


def score_row(y: dict[str, np.ndarray], p: dict[str, np.ndarray]) -> dict[str, object]:
    """The benchmark's columns for one predictor (thresholds from val, scores on test)."""
    comp = slice(0, len(COMPARTMENTS))
    thr = choose_thresholds(y["val"][:, comp], p["val"][:, comp])
    row = multilabel_scores(y["test"][:, comp], p["test"][:, comp], thr, names=COMPARTMENTS)
    yv, pv = y["val"][:, NUC], p["val"][:, NUC]
    grid = np.round(np.arange(0.02, 0.99, 0.02), 2)
    t_nuc = float(grid[int(np.argmax([((pv >= t) == yv).mean() for t in grid]))])
    yt, pt = y["test"][:, NUC], p["test"][:, NUC]
    row["nuclear_auroc"] = auroc_or_nan(yt, pt)
    row["nuclear_accuracy"] = float(((pt >= t_nuc) == yt).mean())
    row["nuclear_threshold"] = t_nuc
    row["nuclear_majority_accuracy"] = float(max(yt.mean(), 1 - yt.mean()))
    return row


def _cell(pc: dict) -> str:
    text = f"AUROC {pc['auroc']:.3f} MCC {pc['mcc']:.3f}"
    return f"{text:>26}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoder", default="pretrained:encoder-small")
    ap.add_argument("--human-only", default=None, help="checkpoint of the encoder trained on human train only")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/localize.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    df = read_human_table()
    presence, _ = compartment_targets(df)
    seqs = {s: df.loc[df["partition"] == s, "sequence"].tolist() for s in ("train", "val", "test")}
    y = {s: presence[(df["partition"] == s).to_numpy()] for s in seqs}
    print({s: len(v) for s, v in seqs.items()})

    rows: dict[str, dict] = {}
    t0 = time.perf_counter()
    rows["composition (AA + dipeptide) logistic regression"] = score_row(y, composition_baseline(seqs, y))
    print(f"composition baseline: {time.perf_counter() - t0:.0f} s")
    speed: dict[str, float] = {}
    p, speed["encoder_proteins_per_s"] = encoder_predictions(args.encoder, seqs)
    rows[f"encoder ({args.encoder})"] = score_row(y, p)
    if args.human_only:
        p, _ = encoder_predictions(args.human_only, seqs)
        rows["same encoder, human train partition only"] = score_row(y, p)

    from protloc.eval.localize import construct_report

    constructs = construct_report(args.encoder)

    print(f"\n{'row':<52} {'macroAUROC':>10} {'macroMCC':>9} {'macroF1':>8} {'nucAUROC':>9} {'nucAcc':>7}")
    for name, r in rows.items():
        print(
            f"{name:<52} {r['macro_auroc']:>10.3f} {r['macro_mcc']:>9.3f} {r['macro_f1']:>8.3f} "
            f"{r['nuclear_auroc']:>9.3f} {r['nuclear_accuracy']:>7.3f}"
        )
    print(f"(nuclear majority-class accuracy on test: {next(iter(rows.values()))['nuclear_majority_accuracy']:.3f})")
    print(f"\n{'compartment':<18} {'n test':>6} " + " ".join(f"{k[:24]:>26}" for k in rows))
    for c in COMPARTMENTS:
        n = next(iter(rows.values()))["per_class"][c]["positives"]
        cells = " ".join(_cell(r["per_class"][c]) for r in rows.values())
        print(f"{c:<18} {n:>6} {cells}")
    print("\nconstructs (nuclear probability, importance peak):")
    for name, c in constructs.items():
        print(f"  {name:<40} {c['nuclear_probability']:.3f}  peak {c['peak']}")
    print(f"\nlocalize speed: {speed['encoder_proteins_per_s']:.1f} proteins/s")

    result = {
        "table": "protloc human proteome (shipped)",
        "partition_sizes": {k: len(v) for k, v in seqs.items()},
        "rows": rows,
        "constructs": constructs,
        "speed": speed,
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(f"written {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
