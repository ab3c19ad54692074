"""Package the CELL-E runs of the proteome world as shipped weights (``src/protloc/weights/<name>/``).

Usage (after the four runs described in the README's "CELL-E on held-out proteins" section)::

    .venv/bin/python scripts/package_celle.py --world runs/p17/world --prepared runs/p17/prepared \\
        --runs runs/p17/celle [--benchmark benchmarks/results/celle_eval.json]

Packages, from ``RUNS/<folder>/best`` (the checkpoint chosen on the val partition):

==========================  ============  =====================================================
name                        run folder    model
==========================  ============  =====================================================
``celle-tiny``              ``enc_ar``    autoregressive CELL-E on the encoder's residues (default)
``celle2-tiny-masked``      ``enc_masked``  masked (CELL-E 2) decoding, same inputs
``celle-tiny-onehot``       ``onehot``    the paper's one-hot ablation
``celle-tiny-noseq``        ``noseq``     the paper's "no sequence" ablation
==========================  ============  =====================================================

All four use the shipped tokenizers (``vqgan-nucleus-tiny``, ``vqgan-threshold-tiny``), found beside
them; the encoder ones read ``pretrained:encoder-small``. Weights are stored as float16 (checked
against the float32 run on validation crops), each folder gets ``config.json``, ``recipe.json`` (the
training configuration with data paths as placeholders, the commands that made the world, the crops and
the run, validation numbers, held-out numbers from ``--benchmark``) and a model card ``README.md``.
Nothing is written unless every model packs; each folder is replaced atomically.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import package_weights as pw  # noqa: E402  (the shared float16 / fidelity helpers)

from protloc import __version__  # noqa: E402
from protloc.pretrained import weights_dir  # noqa: E402

MODELS = {
    "celle-tiny": ("enc_ar", "CELL-E + encoder", "CELL-E tiny on the encoder's per-residue vectors (autoregressive)"),
    "celle2-tiny-masked": (
        "enc_masked",
        "CELL-E 2 masked + encoder",
        "CELL-E tiny with masked (CELL-E 2) decoding on the encoder's per-residue vectors",
    ),
    "celle-tiny-onehot": ("onehot", "CELL-E one-hot", "CELL-E tiny on one-hot residues (the paper's ablation)"),
    "celle-tiny-noseq": (
        "noseq",
        "no sequence",
        "CELL-E tiny, every sequence blanked ('no sequence' ablation)",
    ),
}

WORLD_COMMAND = "protloc world make --out runs/p17/world --mode proteome --proteins 4400 --fovs 2 --workers 2 --seed 0"
PREPARE_COMMAND = (
    "protloc prepare --fovs runs/p17/world/fovs.csv --out runs/p17/prepared --workers 2 --set cytoself=false"
)


def model_attn(cfg: dict[str, Any]) -> float:
    return float(cfg["model"]["attn_dropout"])


def _command(folder: str, cfg: dict[str, Any]) -> str:
    base = (
        "protloc train celle --store runs/p17/prepared/celle.zarr --nucleus-vqgan pretrained:vqgan-nucleus-tiny "
        f"--threshold-vqgan pretrained:vqgan-threshold-tiny --out runs/p17/celle/{folder}"
    )
    sets = [
        f"schedule.max_steps={cfg['schedule']['max_steps']}",
        f"schedule.eval_every={cfg['schedule']['eval_every']}",
        f"save_every={cfg.get('save_every', 0)}",
        f"schedule.eval_blank_sequence={str(cfg['schedule']['eval_blank_sequence']).lower()}",
        # attention dropout sends PyTorch's CPU attention down its slow path (5x per layer): off here
        f"model.attn_dropout={model_attn(cfg)}",
    ]
    model, data = cfg["model"], cfg["data"]
    if model["embedder"] == "encoder":
        sets += [
            "model.embedder=encoder",
            "embedder.path=pretrained:encoder-small",
            f"model.text_dim={model['text_dim']}",
            f"embedder.memory_items={cfg['embedder']['memory_items']}",
        ]
    if model["mode"] != "autoregressive":
        sets.append(f"model.mode={model['mode']}")
    if data["text"] != "sequence":
        sets.append(f"data.text={data['text']}")
    return base + "".join(f" --set {s}" for s in sets)


def _card(name: str, recipe: dict[str, Any], held_out: dict[str, Any] | None) -> str:
    cfg = recipe["training_config"]
    world = recipe["trained_on"]
    lines = [
        f"# {name}",
        "",
        recipe["summary"] + ".",
        "",
        "## What it does",
        "Given an amino-acid sequence and a nucleus image (64 px, ~0.8 um/px after CELL-E's resizing), it samples "
        "the protein's threshold image and a 2D probability map of where the protein is (CELL-E, Khwaja et al.; "
        "`protloc predict`, `screen`, `evaluate`).",
        "",
        "## Architecture",
        f"- transformer: {cfg['model']['mode']} decoding, depth {cfg['model']['depth']}, width {cfg['model']['dim']}, "
        f"{cfg['model']['heads']} heads; 8 x 8 tokens per image from 128 codes;",
        f"- sequence input: `{cfg['model']['embedder']}` embedder"
        + (
            " (the frozen `pretrained:encoder-small`: its per-residue vectors, with its localization summary at "
            "the `<cls>` position)"
            if cfg["model"]["embedder"] == "encoder"
            else ""
        )
        + (" -- blanked: this model never sees a sequence" if cfg["data"]["text"] == "none" else "")
        + f"; window of {cfg['model']['max_residues']} residues (the N-terminal window at inference);",
        "- tokenizers: `vqgan-nucleus-tiny` and `vqgan-threshold-tiny` (shipped beside it, reused unchanged).",
        "",
        "## Training data",
        f"- {world['description']}",
        f"- world: `{world['world_command']}`",
        f"- crops: `{world['prepare_command']}`",
        f"- run: `{recipe['command']}`",
        f"- {recipe['steps']} steps of batch {cfg['data']['batch_size']} (Adam {cfg['optim']['lr']}); checkpoint "
        "chosen by the validation loss on the val partition.",
        "",
        "## Held-out results",
    ]
    if held_out:
        lines += [
            f"On {held_out['proteins']} test-partition proteins ({held_out['crops']} crops; "
            "`benchmarks/celle_eval.py`, mean over proteins):",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        for key, label in held_out["columns"].items():
            v = held_out["row"].get(key)
            if v is not None:
                lines.append(f"| {label} | {v[0]:.3f} |")
        lines.append("")
    else:
        lines += ["Not measured at packaging time: run `benchmarks/celle_eval.py`.", ""]
    lines += [
        "## Limits",
        "- Trained on the protloc reference world's rendered images of real human proteins (GO-derived "
        "compartments), not on microscope images: for real images, train on your own data.",
        "- One nucleus image per prediction; 300 residues of sequence: a signal beyond the window reaches the "
        "model only through the encoder's summary (encoder models) or not at all (one-hot).",
        "",
        f"Packaged with protloc {recipe['packaged_with']['protloc']} (commit {recipe['packaged_with']['git_commit']}).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=Path, required=True)
    ap.add_argument("--prepared", type=Path, required=True)
    ap.add_argument("--runs", type=Path, required=True)
    ap.add_argument("--benchmark", type=Path, default=None, help="celle_eval.py JSON for the model cards")
    ap.add_argument("--out", type=Path, default=weights_dir())
    ap.add_argument("--crops", type=int, default=64, help="validation crops for the float16 fidelity check")
    ap.add_argument("--only", nargs="+", choices=list(MODELS), default=None, help="package only these")
    args = ap.parse_args()
    torch.manual_seed(0)
    world_meta = json.loads((args.world / "world.json").read_text())
    summary = json.loads((args.prepared / "summary.json").read_text())
    bench = json.loads(args.benchmark.read_text()) if args.benchmark else None
    counts = world_meta["partition"]["counts"]
    trained_on = {
        "description": (
            f"protloc reference world, mode proteome: {world_meta['counts']['proteins']} proteins of the shipped "
            f"human table (train {counts['train']}, val {counts['val']}, test {counts['test']} by its homology "
            f"partition) x {world_meta['arguments']['fovs']} fields of view, seed {world_meta['seed']}, 512 px; "
            f"{summary['celle_crops']} CELL-E crops ({summary['celle_split']}); trained on the train partition, "
            "checkpoint chosen on val, test kept for the benchmark"
        ),
        "world_command": WORLD_COMMAND,
        "prepare_command": PREPARE_COMMAND,
        "human_table_sha256": world_meta["partition"].get("table_sha256"),
    }
    staging = Path(tempfile.mkdtemp(prefix=".weights-", dir=args.out.parent))
    try:
        chosen = {k: v for k, v in MODELS.items() if args.only is None or k in args.only}
        for name, (folder, row, description) in chosen.items():
            run = args.runs / folder
            src = pw._checkpoint(run)
            dst = staging / name
            dst.mkdir()
            storage = pw._to_fp16(src / "model.safetensors", dst / "model.safetensors")
            meta = json.loads((src / "config.json").read_text())
            tok = meta["extra"]["tokenizers"]
            for k in ("nucleus", "threshold"):
                tok[k] = f"../vqgan-{k}-tiny"
                tok[f"{k}_sha256"] = pw._sha256(args.out / f"vqgan-{k}-tiny" / "model.safetensors")
            (dst / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
            # the fidelity check loads the packed copy, whose tokenizers must sit beside it
            for k in ("nucleus", "threshold"):
                if not (staging / f"vqgan-{k}-tiny").exists():
                    shutil.copytree(args.out / f"vqgan-{k}-tiny", staging / f"vqgan-{k}-tiny")
            train_cfg = yaml.safe_load((run / "config.yaml").read_text())
            fid = pw._fidelity_celle(src, dst, args.prepared, args.crops)
            extra = meta.get("extra", {})
            held_out = None
            if bench and row in bench.get("over_proteins", {}):
                held_out = {
                    "proteins": bench["proteins"],
                    "crops": bench["crops"],
                    "columns": bench["columns"],
                    "row": bench["over_proteins"][row],
                }
            recipe = {
                "name": name,
                "kind": "celle",
                "steps": extra.get("step") or pw._last_val(run).get("step"),
                "summary": description,
                "trained_on": trained_on,
                "command": _command(folder, train_cfg),
                "training_config": pw._placeholder_paths(train_cfg),
                "validation": extra.get("val") or extra.get("last_val") or pw._last_val(run),
                "held_out_test": held_out,
                "storage": storage,
                "fidelity_vs_float32": fid,
                "source_run": str(run),
                "packaged_with": {"protloc": __version__, "git_commit": pw._git_commit()},
            }
            (dst / "recipe.json").write_text(json.dumps(recipe, indent=2, default=str) + "\n")
            (dst / "README.md").write_text(_card(name, recipe, held_out))
            print(f"{name}: {(dst / 'model.safetensors').stat().st_size / 2**20:.2f} MB, fidelity {fid}")
        pw.install(staging, args.out, chosen)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
