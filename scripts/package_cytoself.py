"""Package a ``small`` cytoself run as the shipped ``cytoself-small`` (``src/protloc/weights/cytoself-small/``).

Usage (after ``protloc train cytoself --preset small`` on the demo world's crops, see the README section
"cytoself: the atlas on held-out fields")::

    .venv/bin/python scripts/package_cytoself.py --run runs/c18/main/run --prepared runs/demo/prepared \\
        [--benchmark benchmarks/results/cytoself_quality.json --row cytoself-small]

Copies ``RUN/best`` (else ``last``) without the two protein-identification heads: they score only the
384 training proteins and hold 13 of the model's 15 M parameters, while embeddings, atlases, feature
spectra and feature zeroing use the encoders, quantizers and decoders alone. The shipped ``config.json``
therefore says ``use_fc: false``; ``recipe.json`` keeps the full training configuration (``use_fc:
true``) and the command that reproduces the run. Weights are stored as float16, checked against the
float32 run on validation crops (share of identical code indices). A model card ``README.md`` holds
the held-out numbers of ``--benchmark``. Nothing is written unless every check passes; the folder is
replaced atomically.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import package_weights as pw  # noqa: E402  (the shared float16 / fidelity helpers)

from protloc import __version__  # noqa: E402
from protloc.pretrained import weights_dir  # noqa: E402

NAME = "cytoself-small"
COMMAND = "protloc train cytoself --preset small --store runs/demo/prepared/cytoself.zarr --out runs/cytoself-small"
SCORES = {
    "knn_f1": "k-NN localization macro-F1 (demo labels: strongest compartment)",
    "knn_f1_unique": "k-NN macro-F1, proteins with one dominant compartment (>= 0.6)",
    "score": "clustering score (UMAP of crops)",
    "score_prot": "clustering score (UMAP, protein medians)",
    "id_top1_global": "protein-ID top-1, global head (chance 1/384 = 0.0026)",
    "family_first": "own family ranked first by the feature spectrum (Fig. 4e)",
}


def _strip_heads(src: Path, dst: Path) -> dict[str, Any]:
    """Float16 copy of the weights without fc1 / fc2."""
    tensors = load_file(str(src))
    kept = {k: v for k, v in tensors.items() if not k.startswith(("fc1.", "fc2."))}
    dropped = sum(v.numel() for k, v in tensors.items() if k not in kept)
    tmp = dst.with_suffix(".fp32.safetensors")
    save_file(kept, str(tmp), metadata={"format": "pt"})
    storage = pw._to_fp16(tmp, dst)
    tmp.unlink()
    storage["dropped_id_head_parameters"] = int(dropped)
    return storage


def _card(recipe: dict[str, Any], row: dict[str, Any] | None, baselines: list[dict[str, Any]]) -> str:
    cfg = recipe["training_config"]
    m = cfg["model"]
    lines = [
        f"# {NAME}",
        "",
        recipe["summary"] + ".",
        "",
        "## What it does",
        "Embeds 100 x 100 crops (tagged-protein channel + signed nuclear distance, ~0.8 um/px after 2x binning) "
        "into cytoself's local (25 x 25 x 32) and global (4 x 4 x 288) quantized representations "
        "(Kobayashi et al. 2022; `protloc embed`, `atlas`, `spectrum`, `interpret`). The default of those commands.",
        "",
        "## Architecture",
        f"- the `small` preset: EfficientNet-style encoders (expansion 6; encoder1 {m['enc1_stages']}, encoder2 "
        f"{m['enc2_stages']}), split quantization ({m['global_split']} x {m['global_dim'] // m['global_split']}-d "
        f"codes, codebooks of {m['codebook_size1']} and {m['codebook_size2']}), decoders {m['decoder1_width']} and "
        f"{m['decoder2_width']} wide;",
        f"- trained with two protein-ID heads ({m['fc_hidden']} hidden units, {m['num_classes']} proteins) that are "
        "not shipped: they name only the training proteins (this file's `config.json` says `use_fc: false`).",
        "",
        "## Training data and recipe",
        f"- {recipe['trained_on']['description']}",
        f"- world: `{recipe['trained_on']['world_command']}`",
        f"- crops: `{recipe['trained_on']['prepare_command']}`",
        f"- run: `{recipe['command']}`",
        f"- {recipe['steps']} steps of batch {cfg['data']['batch_size']}: uniformly shuffled batches from memory, "
        f"Adam {cfg['optim']['lr']} with {cfg['schedule']['warmup_steps']} warm-up steps and cosine decay, "
        f"bf16 autocast, {recipe.get('train_hours', '?')} h on two CPU cores.",
        "",
        "## Held-out results",
    ]
    if row:
        lines += [
            f"On the held-out test fields of view of the demo world ({row.get('n_crops', 'all')} crops; "
            "`benchmarks/cytoself_quality.py`; a crop's k-NN neighbours never come from its own protein):",
            "",
            "| metric | this model | "
            + " | ".join(b["method"] + (f" ({b['images'] // 1000}k img)" if b.get("images") else "") for b in baselines)
            + " |",
            "|---|---|" + "---|" * len(baselines),
        ]
        for key, label in SCORES.items():
            v = row.get(key)
            if v is None:
                continue
            cells = [f"{b[key]:.3f}" if isinstance(b.get(key), int | float) else "-" for b in baselines]
            lines.append(f"| {label} | {v:.3f} | " + " | ".join(cells) + " |")
        lines.append("")
    else:
        lines += ["Not measured at packaging time: run `benchmarks/cytoself_quality.py`.", ""]
    lines += [
        "## Limits",
        "- Trained on the protloc reference world (rendered fields of view of real human proteins with "
        "GO-derived compartments), not on microscope images: for real images, train on your own data "
        "(`protloc train cytoself --preset small`).",
        "- The test fields show the training proteins (the paper's protocol: held-out images, not held-out "
        "proteins); proteins that mix compartments carry one label, which caps the k-NN score "
        "(see the oracle row of the benchmark).",
        "",
        f"Packaged with protloc {recipe['packaged_with']['protloc']} (commit {recipe['packaged_with']['git_commit']}).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--prepared", type=Path, required=True)
    ap.add_argument("--benchmark", type=Path, default=None, help="cytoself_quality.py JSON for the model card")
    ap.add_argument("--row", default="cytoself-small", help="the benchmark row of this run")
    ap.add_argument("--out", type=Path, default=weights_dir())
    ap.add_argument("--crops", type=int, default=256, help="validation crops for the float16 fidelity check")
    args = ap.parse_args()
    torch.manual_seed(0)
    run = args.run
    src = pw._checkpoint(run)
    train_cfg = yaml.safe_load((run / "config.yaml").read_text())
    meta = json.loads((src / "config.json").read_text())
    extra = meta.get("extra", {})
    row, baselines = None, []
    if args.benchmark:
        bench = json.loads(args.benchmark.read_text())
        rows = {r["method"]: r for r in bench["rows"]}
        row = rows.get(args.row)
        baselines = [r for name, r in rows.items() if "noid" in name or name.startswith(("PCA", "oracle"))]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in metrics if r.get("split") == "train"]
    hours = None
    if train and train[-1].get("images_per_s"):
        hours = round(train[-1]["step"] * train_cfg["data"]["batch_size"] / train[-1]["images_per_s"] / 3600, 2)

    staging = Path(tempfile.mkdtemp(prefix=".weights-", dir=args.out.parent))
    try:
        dst = staging / NAME
        dst.mkdir()
        storage = _strip_heads(src / "model.safetensors", dst / "model.safetensors")
        meta["use_fc"] = False
        meta["extra"] = {k: v for k, v in extra.items() if k != "label_map"}
        meta["extra"]["training_proteins"] = sorted(extra.get("label_map", {}))
        (dst / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        fid = pw._fidelity_cytoself(src, dst, args.prepared, args.crops)
        if fid["same_global_codes"] < 0.98:
            raise SystemExit(f"float16 copy changes too many global codes: {fid}")
        recipe = {
            "name": NAME,
            "kind": "cytoself",
            "steps": extra.get("step"),
            "summary": "cytoself small (2 channels, split quantization, protein-ID heads over 384 proteins during "
            "training), trained on two CPU cores",
            "trained_on": dict(pw.WORLD),
            "command": COMMAND,
            "training_config": pw._placeholder_paths(train_cfg),
            "train_hours": hours,
            "validation": extra.get("val") or pw._last_val(run),
            "held_out_test": row,
            "storage": storage,
            "fidelity_vs_float32": fid,
            "source_run": str(run),
            "packaged_with": {"protloc": __version__, "git_commit": pw._git_commit()},
        }
        (dst / "recipe.json").write_text(json.dumps(recipe, indent=2, default=str) + "\n")
        (dst / "README.md").write_text(_card(recipe, row, baselines))
        print(f"{NAME}: {(dst / 'model.safetensors').stat().st_size / 2**20:.2f} MB, fidelity {fid}")
        pw.install(staging, args.out, [NAME])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {args.out / NAME}")


if __name__ == "__main__":
    main()
