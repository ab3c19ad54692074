"""Does cytoself learn localization? Scores on held-out fields of view of the reference world.

Run: ``.venv/bin/python benchmarks/cytoself_quality.py [--prepared runs/demo/prepared --world runs/demo/world]
[--steps 3000] [--json benchmarks/results/cytoself_quality.json]``

Trains the ``tiny`` cytoself preset on the training fields of view, and the same model without the
protein-ID pretext task (the paper's decisive ablation), embeds the test fields of view with both, and
compares them with PCA of the raw pixels (fitted on the training crops) -- all in one run, on the same
crops, with the same scores:

- the paper's clustering score in the 2-D UMAP (spread of class centres over the median within-class
  radius), per crop and per protein;
- leave-protein-out k-NN localization macro-F1 on the representation (a crop's neighbours from its
  own protein are excluded, so identity cannot help).

Localization labels come from the world's truth (``truth.csv``); like the paper's "proteins with a
unique localization", only proteins whose strongest compartment holds at least ``--unique`` of their
signal are labelled, the others are left out of the scores. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.decomposition import PCA

from protloc.analysis.atlas import atlas
from protloc.data.io import CropStore, read_table
from protloc.data.world.compartments import WEIGHT_COLUMNS
from protloc.eval.embed import embed, read_obsm
from protloc.train.cytoself import TrainCytoselfConfig, train_cytoself


def _labels(world: Path, unique: float) -> dict[str, str]:
    truth = read_table(world / "truth.csv")
    cols = [c for c in WEIGHT_COLUMNS if c in truth.columns]
    w = truth[cols].to_numpy(dtype=float)
    keep = w.max(axis=1) >= unique
    pairs = zip(truth["protein_id"], truth["label"], keep, strict=True)
    return {str(p): (str(lab) if k else "") for p, lab, k in pairs}


def _scores(features: np.ndarray, obs: pd.DataFrame, *, seed: int) -> dict:
    adata = ad.AnnData(obs=obs.reset_index(drop=True).astype({"protein_id": str, "label": str}))
    adata.obs.index = adata.obs.index.astype(str)
    adata.obsm["rep"] = features.astype(np.float32)
    res = atlas(adata, use_rep="rep", split=None, random_state=seed)
    return {
        "clustering_score": res["clustering_score"]["localization"],
        "clustering_score_by_protein": res["clustering_score"]["localization_by_protein"],
        "knn_macro_f1": res["knn"]["features"]["macro_f1"],
        "knn_accuracy": res["knn"]["features"]["accuracy"],
        "n_crops": res["n_crops"],
        "n_proteins": res["n_proteins"],
    }


def _raw(store: CropStore, rows: np.ndarray, channels: list[str]) -> np.ndarray:
    out = []
    for s in range(0, len(rows), 512):
        d = store.read(rows[s : s + 512], channels=channels)
        out.append(np.concatenate([np.asarray(d[c], np.float32).reshape(len(d[c]), -1) for c in channels], 1))
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", type=Path, default=Path("runs/demo/prepared"))
    parser.add_argument("--world", type=Path, default=Path("runs/demo/world"))
    parser.add_argument("--out", type=Path, default=Path("runs/cytoself_quality"))
    parser.add_argument("--steps", type=int, default=3000, help="training steps per model (batch 32)")
    parser.add_argument("--unique", type=float, default=0.6, help="min weight of the main compartment")
    parser.add_argument("--pca", type=int, default=144, help="PCA components of the raw-pixel baseline")
    parser.add_argument("--max-train-pca", type=int, default=4000, help="training crops used to fit PCA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/cytoself_quality.json"))
    args = parser.parse_args()

    store_path = args.prepared / "cytoself.zarr"
    store = CropStore.open(store_path)
    labels = _labels(args.world, args.unique)
    obs = store.obs
    test = np.flatnonzero(obs["split"].astype(str).to_numpy() == "test")
    test_obs = obs.iloc[test][["crop_index", "protein_id", "fov_id"]].copy()
    test_obs["label"] = [labels.get(str(p), "") for p in test_obs["protein_id"]]
    rows = []

    base = TrainCytoselfConfig.tiny(store=str(store_path))
    variants = {
        "cytoself (tiny)": base.model,
        "cytoself without ID pretext task": base.model.replace(use_fc=False),
    }
    for name, model_cfg in variants.items():
        cfg = dataclasses.replace(
            base,
            model=model_cfg,
            seed=args.seed,
            schedule=dataclasses.replace(base.schedule, max_steps=args.steps, eval_every=max(args.steps // 10, 1)),
        )
        run = args.out / name.split(" ")[0] / ("id" if model_cfg.use_fc else "no_id")
        t0 = time.perf_counter()
        summary = train_cytoself(cfg, run_dir=run, resume=(run / "last").is_dir(), progress=True)
        t_train = time.perf_counter() - t0
        emb = run / "test.h5ad"
        embed(run, store_path, emb, split="test", overwrite=True, progress=False)
        feats = read_obsm(emb, "global")
        row = {
            "method": name,
            "train_minutes": round(t_train / 60, 2),
            "steps": summary["steps"],
            **_scores(feats, test_obs, seed=args.seed),
        }
        rows.append(row)

    train_rows = np.flatnonzero(obs["split"].astype(str).to_numpy() == "train")
    rng = np.random.default_rng(args.seed)
    fit_rows = np.sort(rng.choice(train_rows, size=min(args.max_train_pca, len(train_rows)), replace=False))
    channels = [c for c in base.data.channels if c in store.channels]
    pca = PCA(n_components=args.pca, random_state=args.seed).fit(_raw(store, fit_rows, channels))
    feats = pca.transform(_raw(store, test, channels))
    rows.append(
        {
            "method": f"PCA of raw pixels ({args.pca} comp.)",
            "train_minutes": 0.0,
            "steps": 0,
            **_scores(feats, test_obs, seed=args.seed),
        }
    )

    header = f"{'method':<36} {'score':>7} {'score/prot':>10} {'kNN F1':>7} {'kNN acc':>7} {'train min':>9}"
    print(header)
    for r in rows:
        print(
            f"{r['method']:<36} {r['clustering_score']:>7.3f} {r['clustering_score_by_protein']:>10.3f} "
            f"{r['knn_macro_f1']:>7.3f} {r['knn_accuracy']:>7.3f} {r['train_minutes']:>9.1f}"
        )
    out = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
        "labelled_test_proteins": int(test_obs.loc[test_obs["label"] != "", "protein_id"].nunique()),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
