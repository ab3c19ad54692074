"""CELL-E on CPU: tokenizers + transformer within 30 minutes, and what the sequence contributes.

Run: ``.venv/bin/python benchmarks/celle_quality.py [--prepared runs/celle/prepared] [--out runs/celle/bench]
[--vqgan-steps 1500] [--celle-steps 2500] [--json benchmarks/results/celle_quality.json]``

In one run, on the CELL-E crop store of the reference world (``protloc world make`` + ``protloc
prepare``, split 80/20 by protein as in the paper), with the ``tiny`` presets:

1. trains the nucleus VQGAN and the threshold VQGAN and reports their validation reconstruction
   (threshold images: pixel accuracy and nucleus-proportion accuracy of the reconstructions -- the
   ceiling of any CELL-E prediction, paper Table S.2: 0.87-0.88 and 0.99; codebook use);
2. trains the CELL-E transformer on their tokens and, as the paper's "no sequence" ablation, the same
   model with every sequence replaced by padding (``data.text=none``);
3. reports the validation loss per segment (held-out proteins, deterministic crops) of both, and of
   the sequence model with its sequences blanked at evaluation time.

The wall time of the two VQGANs plus the CELL-E transformer is the figure the 30-minute budget is
about; the ablation run comes on top. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from protloc.train.celle import TrainCelleConfig, train_celle
from protloc.train.vqgan import TrainVQGANConfig, train_vqgan

SEGMENTS = ("text", "nucleus", "threshold")


def _vqgan(store: Path, out: Path, kind: str, steps: int, fresh: bool) -> tuple[dict, float]:
    run = out / f"vqgan_{kind}"
    if fresh and run.exists():
        shutil.rmtree(run)
    base = TrainVQGANConfig.tiny(store=str(store), kind=kind)
    cfg = dataclasses.replace(base, schedule=dataclasses.replace(base.schedule, max_steps=steps))
    t0 = time.perf_counter()
    summary = train_vqgan(cfg, run_dir=run, resume=run.joinpath("last").exists(), progress=True)
    return summary, time.perf_counter() - t0


def _celle(store: Path, out: Path, tok: Path, name: str, steps: int, text: str, fresh: bool) -> tuple[dict, float]:
    run = out / name
    if fresh and run.exists():
        shutil.rmtree(run)
    base = TrainCelleConfig.tiny(str(store), nucleus=str(tok / "vqgan_nucleus"), threshold=str(tok / "vqgan_threshold"))
    cfg = dataclasses.replace(
        base,
        data=dataclasses.replace(base.data, text=text),
        schedule=dataclasses.replace(base.schedule, max_steps=steps),
    )
    t0 = time.perf_counter()
    summary = train_celle(cfg, run_dir=run, resume=run.joinpath("last").exists(), progress=True)
    return summary, time.perf_counter() - t0


def _best_val(run: Path) -> dict:
    """The validation record of the best checkpoint (lowest validation loss)."""
    meta = json.loads((run / "best" / "config.json").read_text())
    return meta["extra"]["val"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepared", type=Path, default=Path("runs/celle/prepared"))
    ap.add_argument("--out", type=Path, default=Path("runs/celle/bench"))
    ap.add_argument("--vqgan-steps", type=int, default=1500)
    ap.add_argument("--celle-steps", type=int, default=2500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--tokenizers",
        type=Path,
        default=None,
        help="reuse the vqgan_nucleus / vqgan_threshold runs of an earlier benchmark folder (no VQGAN training)",
    )
    ap.add_argument("--fresh", action="store_true", help="retrain everything (default: resume finished runs)")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/celle_quality.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    store = args.prepared / "celle.zarr"
    summary = json.loads((args.prepared / "summary.json").read_text())
    args.out.mkdir(parents=True, exist_ok=True)

    times: dict[str, float] = {}
    vq: dict[str, dict] = {}
    tok = args.tokenizers or args.out
    for kind in ("nucleus", "threshold"):
        if args.tokenizers is None:
            s, t = _vqgan(store, args.out, kind, args.vqgan_steps, args.fresh)
            times[f"vqgan_{kind}"] = t
            steps = s["steps"]
        else:
            times[f"vqgan_{kind}"] = 0.0  # trained by an earlier run, on other crops
            steps = json.loads((tok / f"vqgan_{kind}" / "last" / "config.json").read_text())["extra"]["step"]
        vq[kind] = {"steps": steps, "run": str(tok / f"vqgan_{kind}"), "best_val": _best_val(tok / f"vqgan_{kind}")}
    runs: dict[str, dict] = {}
    for name, text in (("celle", "sequence"), ("celle_no_sequence", "none")):
        s, t = _celle(store, args.out, tok, name, args.celle_steps, text, args.fresh)
        times[name] = t
        runs[name] = {"steps": s["steps"], "samples_per_s": s["samples_per_s"], "best_val": _best_val(args.out / name)}
    budget = times["vqgan_nucleus"] + times["vqgan_threshold"] + times["celle"]

    thr = vq["threshold"]["best_val"]
    nuc = vq["nucleus"]["best_val"]
    print(f"\n== VQGAN tokenizers (validation crops, best checkpoint; {tok}) ==")
    print(
        f"  threshold: pixel accuracy {thr['pixel_accuracy']:.3f} (paper ceiling 0.87), nucleus-proportion "
        f"accuracy {thr['nucleus_proportion_accuracy']:.3f} (0.99), codes used {thr['codes_used']}"
    )
    print(f"  nucleus:   reconstruction MSE {nuc['rec_mse']:.5f}, codes used {nuc['codes_used']}")
    print("\n== CELL-E validation loss per segment (held-out proteins; best checkpoint) ==")
    print(f"  {'model':32s} {'text':>8s} {'nucleus':>8s} {'threshold':>10s} {'thr acc':>8s}")
    seq, none = runs["celle"]["best_val"], runs["celle_no_sequence"]["best_val"]
    rows = [
        ("CELL-E tiny (sequence)", seq, ""),
        ("same model, sequence blanked", seq, "blank_"),
        ("no-sequence ablation (trained)", none, ""),
    ]
    for label, rec, pre in rows:
        vals = [rec.get(f"{pre}loss_{s}") for s in SEGMENTS]
        txt = " ".join(f"{v:8.4f}" if v is not None else f"{'-':>8s}" for v in vals[:2])
        print(f"  {label:32s} {txt} {vals[2]:10.4f} {rec.get(f'{pre}acc_threshold', float('nan')):8.4f}")
    print(
        f"\n  wall time: VQGAN nucleus {times['vqgan_nucleus'] / 60:.1f} min, VQGAN threshold "
        f"{times['vqgan_threshold'] / 60:.1f} min, CELL-E {times['celle'] / 60:.1f} min: "
        f"{budget / 60:.1f} min together (budget 30); ablation {times['celle_no_sequence'] / 60:.1f} min"
    )

    result = {
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "data": {
            "prepared": str(args.prepared),
            "celle_crops": summary.get("celle_crops"),
            "celle_split": summary.get("celle_split"),
        },
        "vqgan": vq,
        "celle": runs,
        "seconds": times,
        "budget_seconds": budget,
        "threshold_loss_gain_from_sequence": none["loss_threshold"] - seq["loss_threshold"],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
