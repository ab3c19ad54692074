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
import pandas as pd
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


def encoder_predictions(
    checkpoint: str, seqs: dict[str, list[str]], splits: tuple[str, ...] = ("val", "test")
) -> tuple[dict[str, np.ndarray], float]:
    """Presence probabilities of an encoder on ``splits``, and its proteins/s over them."""
    from protloc.eval.localize import load_encoder, presence_probabilities

    model, _ = load_encoder(checkpoint)
    out, n, t0 = {}, 0, time.perf_counter()
    for k in splits:
        out[k] = presence_probabilities(model, seqs[k])
        n += len(seqs[k])
    return out, n / (time.perf_counter() - t0)


#: Peak throughput of this 2-core machine (the figures benchmarks/cytoself_speed.py uses): fp32 and bf16.
PEAK_GFLOPS = {"fp32": 190.0, "bf16": 350.0}


def training_speed(table: pd.DataFrame, *, tokens: int = 8192, steps: int = 4) -> dict[str, float]:
    """Residues/s and FLOP/s of the shipped recipe's training step (small model, bf16 autocast, AdamW).

    One batch of real human sequences packed to ``tokens`` padded tokens (as the trainer's sampler
    does), its FLOPs counted by :class:`torch.utils.flop_counter.FlopCounterMode`, then timed.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from protloc.data.sequence_data import ProteinDataset
    from protloc.models.encoder import EncoderConfig, ProteinEncoder

    order = np.random.default_rng(0).permutation(len(table))
    ds = ProteinDataset(table.iloc[order[:2000]], mask_prob=0.1)
    # a length bucket near the median, as the sampler forms them
    lengths = ds.lengths
    mid = np.argsort(lengths)[len(lengths) // 2 :]
    batch_idx, width = [], 0
    for i in mid:
        width = max(width, int(lengths[i]))
        if width * (len(batch_idx) + 1) > tokens:
            break
        batch_idx.append(int(i))
    batch = ds.collate(batch_idx)
    model = ProteinEncoder(EncoderConfig.small())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.loss(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t0) / steps
    residues = int(batch["mask"].sum()) - 2 * len(batch_idx)
    return {
        "batch_sequences": len(batch_idx),
        "batch_padded_tokens": int(batch["mask"].numel()),
        "seconds_per_step": dt,
        "residues_per_s": residues / dt,
        "gflop_per_step": flops / 1e9,
        "gflop_per_s": flops / 1e9 / dt,
        "share_of_bf16_peak": flops / 1e9 / dt / PEAK_GFLOPS["bf16"],
        "share_of_fp32_peak": flops / 1e9 / dt / PEAK_GFLOPS["fp32"],
    }


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
    ap.add_argument(
        "--human-only",
        action="append",
        default=[],
        metavar="[LABEL=]CHECKPOINT",
        help="an encoder trained on the human train partition only (repeatable; LABEL names its row)",
    )
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/localize.json"))
    ap.add_argument("--limit", type=int, default=0, help="at most this many proteins per partition (a quick check)")
    ap.add_argument(
        "--row", action="append", default=[], metavar="LABEL=CHECKPOINT", help="another encoder row (repeatable)"
    )
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    df = read_human_table()
    if args.limit:
        df = df.groupby("partition").head(args.limit).reset_index(drop=True)
    presence, _ = compartment_targets(df)
    seqs = {s: df.loc[df["partition"] == s, "sequence"].tolist() for s in ("train", "val", "test")}
    y = {s: presence[(df["partition"] == s).to_numpy()] for s in seqs}
    print({s: len(v) for s, v in seqs.items()})

    rows: dict[str, dict] = {}
    t0 = time.perf_counter()
    rows["composition (AA + dipeptide) logistic regression"] = score_row(y, composition_baseline(seqs, y))
    print(f"composition baseline: {time.perf_counter() - t0:.0f} s")
    speed: dict[str, float] = {}
    # the shipped encoder over the whole table: the speed of localizing a proteome
    p, speed["encoder_proteins_per_s"] = encoder_predictions(args.encoder, seqs, ("train", "val", "test"))
    speed["whole_table_seconds"] = sum(map(len, seqs.values())) / speed["encoder_proteins_per_s"]
    rows[f"encoder ({args.encoder})"] = score_row(y, p)
    for spec in args.row:
        label, _, ckpt = spec.partition("=")
        p, _ = encoder_predictions(ckpt, seqs)
        rows[label] = score_row(y, p)
    for spec in args.human_only:
        label, _, ckpt = spec.rpartition("=")
        p, _ = encoder_predictions(ckpt, seqs)
        rows[f"same encoder, human train partition only{f' ({label})' if label else ''}"] = score_row(y, p)

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
    print(
        f"\nlocalize speed: {speed['encoder_proteins_per_s']:.1f} proteins/s (no importance tracks): the "
        f"{sum(map(len, seqs.values()))} human proteins in {speed['whole_table_seconds']:.0f} s"
    )
    train = training_speed(df)
    print(
        f"training step (small, bf16 autocast, {train['batch_sequences']} sequences, {train['batch_padded_tokens']} "
        f"padded tokens): {train['residues_per_s']:.0f} residues/s, {train['gflop_per_s']:.1f} GFLOP/s = "
        f"{train['share_of_bf16_peak']:.1%} of the bf16 peak ({train['share_of_fp32_peak']:.1%} of fp32)"
    )

    result = {
        "table": "protloc human proteome (shipped)",
        "partition_sizes": {k: len(v) for k, v in seqs.items()},
        "rows": rows,
        "constructs": constructs,
        "speed": speed,
        "training_speed": train,
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(f"written {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
