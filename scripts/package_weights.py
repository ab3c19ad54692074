"""Package trained ``tiny`` runs as protloc's shipped weights (``src/protloc/weights/<name>/``).

Usage (after training on the reference world, e.g. with ``protloc demo --train``)::

    .venv/bin/python scripts/package_weights.py --prepared runs/demo/prepared \\
        --cytoself runs/demo/train/cytoself --vqgan-nucleus runs/demo/train/vqgan_nucleus \\
        --vqgan-threshold runs/demo/train/vqgan_threshold --celle runs/demo/train/celle

For each run it copies ``best/`` (else ``last/``): the float32 weights are stored as float16 (half the
size; every tensor is checked to fit float16's range, else kept float32), ``config.json`` as written by
training (CELL-E's tokenizer paths become the relative ``../vqgan-*-tiny`` folders and their SHA-256 the
packaged files'), and ``recipe.json``: the training configuration with the data paths as placeholders,
the command that reproduces the run, the world it was trained on, its validation numbers, and the
fidelity of the float16 copy measured here on validation crops (cytoself: share of identical global
code indices; VQGANs: share of identical tokens; CELL-E: largest difference of the next-token
probabilities). Nothing is written unless every check passes; each folder is replaced atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from protloc import __version__
from protloc.pretrained import weights_dir

FP16_MAX = 65504.0


def _checkpoint(run: Path) -> Path:
    for sub in ("best", "last"):
        if (run / sub / "model.safetensors").is_file():
            return run / sub
    if (run / "model.safetensors").is_file():
        return run
    raise SystemExit(f"{run}: no model.safetensors in best/ or last/")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _to_fp16(src: Path, dst: Path) -> dict[str, Any]:
    tensors = load_file(str(src))
    out, kept = {}, []
    for k, t in tensors.items():
        if t.dtype == torch.float32 and (t.numel() == 0 or float(t.abs().max()) < FP16_MAX):
            out[k] = t.to(torch.float16)
        else:
            out[k] = t
            if t.dtype == torch.float32:
                kept.append(k)
    save_file(out, str(dst), metadata={"format": "pt"})
    dst.chmod(0o644)
    return {"stored_dtype": "float16", "kept_float32": kept}


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _last_val(run: Path) -> dict[str, Any]:
    """The last validation record of a run's metrics.jsonl."""
    last: dict[str, Any] = {}
    path = run / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("split", rec.get("kind")) in ("val", "eval") or any(k.startswith("val") for k in rec):
                last = rec
    return last


def _placeholder_paths(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = json.loads(json.dumps(cfg))
    data = cfg.get("data", {})
    if "store" in data:
        data["store"] = "<prepared>/" + Path(str(data["store"])).name
    if data.get("sequences"):
        data["sequences"] = "<prepared>/" + Path(str(data["sequences"])).name
    if "tokenizers" in cfg:
        cfg["tokenizers"] = {"nucleus": "<vqgan_nucleus run>", "threshold": "<vqgan_threshold run>"}
    return cfg


WORLD = {
    "description": "reference cell world, mode real: all 384 proteins x 4 fields of view, seed 0, 512 px; "
    "protloc prepare defaults; trained on the 'train' split, validated on 'val'",
    "world_command": "protloc world make --out runs/demo/world --proteins 0 --fovs 4 --seed 0",
    "prepare_command": "protloc prepare --fovs runs/demo/world/fovs.csv "
    "--sequences runs/demo/world/sequences.fasta --out runs/demo/prepared",
}

COMMANDS = {
    "cytoself": "protloc train cytoself --config recipe.yaml --store runs/demo/prepared/cytoself.zarr "
    "--out runs/demo/train/cytoself",
    "vqgan-nucleus": "protloc train vqgan --kind nucleus --config recipe.yaml "
    "--store runs/demo/prepared/celle.zarr --out runs/demo/train/vqgan_nucleus",
    "vqgan-threshold": "protloc train vqgan --kind threshold --config recipe.yaml "
    "--store runs/demo/prepared/celle.zarr --out runs/demo/train/vqgan_threshold",
    "celle": "protloc train celle --config recipe.yaml --store runs/demo/prepared/celle.zarr "
    "--nucleus-vqgan runs/demo/train/vqgan_nucleus --threshold-vqgan runs/demo/train/vqgan_threshold "
    "--out runs/demo/train/celle",
}


def install(staging: Path, out: Path, names: Any) -> None:
    """Move the packed folders ``names`` from ``staging`` into ``out``, each replacing its old copy."""
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        final = out / name
        old = out / f".{name}.old"
        if final.exists():
            final.rename(old)
        (staging / name).rename(final)
        shutil.rmtree(old, ignore_errors=True)


def _fidelity_cytoself(orig: Path, packed: Path, prepared: Path, n: int) -> dict[str, Any]:
    from protloc.data.io import CropStore
    from protloc.eval.load import load_cytoself

    store = CropStore.open(prepared / "cytoself.zarr")
    rows = np.flatnonzero(store.obs["split"].astype(str).to_numpy() == "val")[:n]
    chans = [np.stack([store[c][int(i)] for i in rows]) for c in ("protein", "nucleus_distance")]
    x = torch.from_numpy(np.stack(chans, axis=1).astype(np.float32))
    out = {}
    for tag, path in (("fp32", orig), ("fp16", packed)):
        model = load_cytoself(path)
        with torch.no_grad():
            enc = model.encode(x)
        out[tag] = enc
    a, b = out["fp32"], out["fp16"]
    return {
        "crops": len(rows),
        "same_global_codes": float((a.idx2 == b.idx2).float().mean()),
        "same_local_codes": float((a.idx1 == b.idx1).float().mean()),
        "max_abs_global_difference": float((a.q2 - b.q2).abs().max()),
    }


def _celle_val(prepared: Path, image_size: int, max_residues: int, n: int):
    from protloc.data.datasets import CelleDataset
    from protloc.data.sequences import read_sequences

    ds = CelleDataset(
        prepared / "celle.zarr",
        split="val",
        sequences=read_sequences(prepared / "sequences.fasta"),
        image_size=image_size,
        max_residues=max_residues,
    )
    picks = np.linspace(0, len(ds) - 1, min(n, len(ds))).astype(int)
    return [ds[int(i)] for i in picks]


def _fidelity_vqgan(orig: Path, packed: Path, kind: str, prepared: Path, n: int) -> dict[str, Any]:
    from protloc.eval.load import load_tokenizer

    a, _, _ = load_tokenizer(orig, kind)
    b, _, _ = load_tokenizer(packed, kind)
    items = _celle_val(prepared, a.config.image_size, 1000, n)
    x = torch.stack([it[kind] for it in items]).float()
    with torch.no_grad():
        ia, ib = a.encode(x)[1], b.encode(x)[1]
    return {"crops": len(items), "same_tokens": float((ia == ib).float().mean())}


def _fidelity_celle(orig: Path, packed: Path, prepared: Path, n: int) -> dict[str, Any]:
    from protloc.eval.load import load_celle_run
    from protloc.eval.predict import SamplingConfig, predict

    a = load_celle_run(orig)
    b = load_celle_run(packed)
    items = _celle_val(prepared, a.image_size, a.model.config.max_residues, n)
    nuc = torch.stack([it["nucleus"] for it in items]).float()
    seqs = [it["sequence"] for it in items]
    sampling = SamplingConfig(seed=0)
    ra, rb = predict(a, seqs, nuc, sampling=sampling), predict(b, seqs, nuc, sampling=sampling)
    pa, pb = ra["probability"].float(), rb["probability"].float()
    tv = 0.5 * (pa - pb).abs().flatten(1).sum(1)
    dprop = (ra["nucleus_proportion"].float() - rb["nucleus_proportion"].float()).abs()
    return {
        "crops": len(items),
        "same_sampled_tokens": float((ra["tokens"] == rb["tokens"]).float().mean()),
        "mean_probability_map_tv": float(tv.mean()),
        "mean_abs_nucleus_proportion_difference": float(dprop.mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepared", type=Path, required=True, help="the prepared reference world the runs used")
    ap.add_argument("--cytoself", type=Path, required=True)
    ap.add_argument("--vqgan-nucleus", type=Path, required=True)
    ap.add_argument("--vqgan-threshold", type=Path, required=True)
    ap.add_argument("--celle", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=weights_dir())
    ap.add_argument("--crops", type=int, default=256, help="validation crops for the fidelity checks")
    args = ap.parse_args()
    torch.manual_seed(0)

    runs = {
        "cytoself-tiny": ("cytoself", args.cytoself),
        "vqgan-nucleus-tiny": ("vqgan-nucleus", args.vqgan_nucleus),
        "vqgan-threshold-tiny": ("vqgan-threshold", args.vqgan_threshold),
        "celle-tiny": ("celle", args.celle),
    }
    staging = Path(tempfile.mkdtemp(prefix=".weights-", dir=args.out.parent))
    try:
        for name, (kind, run) in runs.items():
            src = _checkpoint(run)
            dst = staging / name
            dst.mkdir()
            storage = _to_fp16(src / "model.safetensors", dst / "model.safetensors")
            meta = json.loads((src / "config.json").read_text())
            if kind == "celle":
                tok = meta["extra"]["tokenizers"]
                for k in ("nucleus", "threshold"):
                    rel = f"../vqgan-{k}-tiny"
                    tok[k] = rel
                    tok[f"{k}_sha256"] = _sha256(staging / f"vqgan-{k}-tiny" / "model.safetensors")
                meta["extra"]["tokenizers"] = tok
            (dst / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
            train_cfg = yaml.safe_load((run / "config.yaml").read_text())
            if kind == "cytoself":
                fid = _fidelity_cytoself(src, dst, args.prepared, args.crops)
            elif kind == "celle":
                fid = _fidelity_celle(src, dst, args.prepared, min(args.crops, 64))
            else:
                fid = _fidelity_vqgan(src, dst, kind.split("-")[1], args.prepared, args.crops)
            extra = meta.get("extra", {})
            recipe = {
                "name": name,
                "kind": kind,
                "steps": extra.get("step") or _last_val(run).get("step"),
                "summary": {
                    "cytoself": "cytoself tiny (2 channels, split quantization, protein-ID heads over 384 proteins)",
                    "vqgan-nucleus": "CELL-E nucleus tokenizer (64 px -> 8x8 tokens, 128 codes)",
                    "vqgan-threshold": "CELL-E protein-threshold tokenizer (64 px -> 8x8 tokens, 128 codes)",
                    "celle": "CELL-E tiny (autoregressive, one-hot residues, 300-residue window)",
                }[kind],
                "trained_on": WORLD,
                "command": COMMANDS[kind],
                "training_config": _placeholder_paths(train_cfg),
                "validation": extra.get("val") or extra.get("last_val") or _last_val(run),
                "storage": storage,
                "fidelity_vs_float32": fid,
                "source_run": str(run),
                "packaged_with": {"protloc": __version__, "git_commit": _git_commit()},
            }
            (dst / "recipe.json").write_text(json.dumps(recipe, indent=2, default=str) + "\n")
            print(f"{name}: {(dst / 'model.safetensors').stat().st_size / 2**20:.2f} MB, fidelity {fid}")
        install(staging, args.out, runs)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
