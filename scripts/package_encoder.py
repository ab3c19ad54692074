"""Package a trained protein-encoder run as a shipped checkpoint (``src/protloc/weights/<name>/``).

Usage (after ``protloc train encoder``)::

    .venv/bin/python scripts/package_encoder.py --run runs/encoder \\
        --corpus ~/.cache/protloc/protein-corpus/corpus.tsv.gz \\
        [--name encoder-small] [--benchmark benchmarks/results/localize.json]

Copies ``best/`` (else ``last/``) with the float32 weights stored as float16 (``package_weights._to_fp16``),
chooses the call thresholds on the human **val** partition with the packaged weights (per compartment
the one that maximises MCC; for ``nucleus`` the one that maximises accuracy) and writes:

- ``config.json`` as written by training;
- ``recipe.json``: the corpus build and training commands, the training configuration, the SHA-256 of the
  corpus and of the human table (the partition), the thresholds, the validation curve from
  ``metrics.jsonl``, the float16 fidelity (largest difference of any presence probability on the val
  proteins), and the held-out scores from ``benchmarks/localize.py`` when ``--benchmark`` is given;
- ``README.md``: the model card (data and licence, intended use, limitations, held-out metrics, how to
  reproduce).

The folder is replaced atomically; nothing is written unless every step passes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "src"))

import package_weights as pw  # noqa: E402

from protloc import __version__  # noqa: E402
from protloc.data.proteome import (  # noqa: E402
    PRESENCE_NAMES,
    compartment_targets,
    human_table_path,
    read_human_table,
    table_sha256,  # noqa: E402
)
from protloc.eval.localization import choose_thresholds  # noqa: E402
from protloc.pretrained import weights_dir  # noqa: E402

GRID = np.round(np.arange(0.02, 0.99, 0.02), 2)
CORPUS_COMMAND = "python scripts/build_protein_corpus.py"


def _curve(run: Path) -> list[dict[str, Any]]:
    out = []
    path = run / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("split") == "val":
                out.append({k: rec[k] for k in ("step", "val_macro_auroc", "val_nucleus_auroc", "loss") if k in rec})
    return out


def _trained_on(corpus: Path, human_only: bool) -> dict[str, Any]:
    log_path = corpus.with_name("corpus_provenance.json")
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    parts = log.get("human_partition_counts", {})
    others = "" if human_only else f"{log.get('corpus_nonhuman', '?')} proteins of other species + "
    return {
        "description": (
            f"protloc Swiss-Prot localization corpus (UniProtKB/Swiss-Prot 2014-01, GO CC): {others}the "
            f"{parts.get('train', '?')} human train-partition proteins; model chosen on the "
            f"{parts.get('val', '?')} human val proteins"
        ),
        "human_only": human_only,
        "corpus_counts": log,
    }


def _probabilities(ckpt: Path, seqs: list[str]) -> np.ndarray:
    from protloc.eval.localize import load_encoder, presence_probabilities

    model, _ = load_encoder(ckpt)
    return presence_probabilities(model, seqs)


def thresholds_on_val(ckpt: Path, val: pd.DataFrame) -> tuple[dict[str, float], np.ndarray]:
    """Call thresholds chosen on the human val proteins, and the presence probabilities they came from."""
    y, _ = compartment_targets(val)
    p = _probabilities(ckpt, val["sequence"].tolist())
    t = choose_thresholds(y[:, :-1], p[:, :-1])
    acc = [((p[:, -1] >= g) == y[:, -1]).mean() for g in GRID]
    out = {n: float(v) for n, v in zip(PRESENCE_NAMES[:-1], t, strict=True)}
    out["nucleus"] = float(GRID[int(np.argmax(acc))])
    return out, p


def model_card(name: str, recipe: dict[str, Any]) -> str:
    bench = recipe.get("held_out_test") or {}
    rows = bench.get("rows", {})
    lines = [
        f"# {name}: protloc's protein sequence encoder",
        "",
        recipe["summary"],
        "",
        "## Data and licence",
        "",
        f"Trained on: {recipe['trained_on']['description']}. The corpus (`scripts/build_protein_corpus.py`): "
        "UniProtKB/Swiss-Prot 2014-01 proteins with GO cellular-component annotations "
        "(Debian `metastudent-data` 2.0.1-8), "
        "mapped to 12 compartments through GO.db 3.16; human proteins labelled from org.Hs.eg.db 3.16 (non-IEA "
        "evidence). Data licences: UniProtKB CC BY 4.0, Gene Ontology CC BY 4.0. The weights are MIT like protloc.",
        "",
        f"Homology partition: the shipped human table (SHA-256 `{recipe['human_table_sha256']}`); human val / test "
        "proteins and every non-human protein homologous to them (>= 30% identity over >= 50% of the shorter "
        "sequence) were never trained on. Model choice and call thresholds: human val partition only.",
        "",
        "## Intended use",
        "",
        "Sequence-only, multi-label compartment probabilities for human proteins (`protloc localize`), per-residue "
        "importance tracks, and frozen per-residue embeddings for CELL-E (`model.embedder=encoder`).",
        "",
        "## Limitations",
        "",
        "- Small (about 1 M parameters) and trained for under an hour on 2 CPU cores: far below pretrained protein "
        "language models (ESM-2, ProtT5); use those (as local files) when you have them.",
        "- Labels are GO annotations, not images: 'cytosol' includes generic 'cytoplasm' annotations, and a protein's "
        "unannotated compartments count as negatives.",
        "- Sequences over 1000 residues are read as their first and last 500 residues (DeepLoc's rule).",
        "- Isoforms, post-translational regulation and cell-type specific localization are not modelled.",
        "",
        "## Held-out metrics (human test partition)",
        "",
    ]
    if rows:
        lines += [
            "| predictor | macro AUROC | macro MCC | macro F1 | nuclear AUROC | nuclear accuracy |",
            "|---|---|---|---|---|---|",
        ]
        for k, r in rows.items():
            lines.append(
                f"| {k} | {r['macro_auroc']:.3f} | {r['macro_mcc']:.3f} | {r['macro_f1']:.3f} | "
                f"{r['nuclear_auroc']:.3f} | {r['nuclear_accuracy']:.3f} |"
            )
    else:
        lines.append("Not measured at packaging time; run `benchmarks/localize.py`.")
    lines += [
        "",
        "## How to reproduce",
        "",
        "```",
        recipe["corpus_command"],
        recipe["command"],
        f"python scripts/package_encoder.py --run runs/encoder --corpus <cache>/corpus.tsv.gz --name {name}",
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--name", default="encoder-small")
    ap.add_argument("--benchmark", type=Path, default=None, help="results JSON of benchmarks/localize.py")
    ap.add_argument("--out", type=Path, default=weights_dir())
    ap.add_argument(
        "--history",
        type=Path,
        default=None,
        help="text file: the exact commands the run went through (one per line), recorded as commands_run",
    )
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    src = pw._checkpoint(args.run)
    staging = Path(tempfile.mkdtemp(prefix=".weights-", dir=args.out.parent))
    try:
        dst = staging / args.name
        dst.mkdir()
        storage = pw._to_fp16(src / "model.safetensors", dst / "model.safetensors")
        shutil.copy2(src / "config.json", dst / "config.json")
        df = read_human_table()
        val = df[df["partition"] == "val"]
        thresholds, p16 = thresholds_on_val(dst, val)
        p32 = _probabilities(src, val["sequence"].tolist())
        train_cfg = yaml.safe_load((args.run / "config.yaml").read_text())
        train_cfg.setdefault("data", {})["corpus"] = "<cache>/corpus.tsv.gz"
        meta = json.loads((src / "config.json").read_text())
        recipe: dict[str, Any] = {
            "name": args.name,
            "kind": "encoder",
            "summary": "Protein sequence encoder (dilated CNN + transformer, light-attention pooling) trained on "
            + ("the human train partition of " if train_cfg.get("data", {}).get("human_only") else "")
            + "Swiss-Prot 2014-01 GO cellular-component annotations mapped to protloc's 12 compartments, with a "
            "masked-residue objective.",
            "trained_on": _trained_on(args.corpus, bool(train_cfg.get("data", {}).get("human_only"))),
            "corpus_command": CORPUS_COMMAND,
            "corpus_sha256": table_sha256(args.corpus),
            "human_table_sha256": table_sha256(human_table_path()),
            "command": "protloc train encoder --config recipe.yaml --corpus <cache>/corpus.tsv.gz --out runs/encoder",
            "training_config": train_cfg,
            "commands_run": args.history.read_text().splitlines() if args.history else [],
            "steps": meta.get("extra", {}).get("step"),
            "validation": pw._last_val(args.run),
            "validation_curve": _curve(args.run),
            "thresholds": thresholds,
            "storage": storage,
            "fidelity_vs_float32": {"max_abs_presence_probability_diff_val": float(np.abs(p16 - p32).max())},
            "source_run": str(args.run),
            "packaged_with": {"protloc": __version__, "git_commit": pw._git_commit()},
        }
        if args.benchmark is not None:
            recipe["held_out_test"] = json.loads(args.benchmark.read_text())
        (dst / "recipe.json").write_text(json.dumps(recipe, indent=2, default=str) + "\n")
        (dst / "README.md").write_text(model_card(args.name, recipe))
        print(f"{args.name}: {(dst / 'model.safetensors').stat().st_size / 2**20:.2f} MB, thresholds {thresholds}")
        args.out.mkdir(parents=True, exist_ok=True)
        final, old = args.out / args.name, args.out / f".{args.name}.old"
        if final.exists():
            final.rename(old)
        dst.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {args.out / args.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
