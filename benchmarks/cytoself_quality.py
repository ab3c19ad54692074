"""Does cytoself learn localization? An ablation table on held-out fields of view of the reference world.

Run (every variant in one process)::

    .venv/bin/python benchmarks/cytoself_quality.py --variants tiny,tiny-noid --images 64000

or split the variants over processes that share ``--out`` (each writes ``OUT/rows/NAME.json``; a run
already finished is only re-scored), then print and write the whole table::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cytoself_quality.py --variants tiny --threads 1 &
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cytoself_quality.py --variants small --threads 1 &
    wait; .venv/bin/python benchmarks/cytoself_quality.py --table

Every variant trains on the training fields of view of the demo's reference world (``--prepared``,
``--world``) for the same number of training images (``--images``; steps = images / batch), keeps its
best checkpoint on the validation fields, and embeds the held-out test fields. The table also holds, on
the same crops and labels:

- ``PCA of raw pixels``: PCA fitted on training crops (the paper's baseline);
- ``oracle: true compartment weights``: k-NN on each protein's true compartment weights from the world's
  ``truth.csv`` -- the best any image representation can do with these labels, because proteins that
  mix compartments carry one label (their strongest compartment).

Scores (all on the test fields; a crop's neighbours never come from its own protein):

- ``knn_f1``: k-NN (k=15, cosine) localization macro-F1 with the demo's labels (every protein labelled
  with its strongest compartment, classes with >= 2 test proteins), and ``knn_f1_unique`` with only the
  proteins whose strongest compartment holds >= ``--unique`` of their signal;
- ``score`` / ``score_prot``: the paper's clustering score in the 2-D UMAP of the crops, and of the
  protein medians (demo labels);
- ``id_top1_global`` / ``id_top1_local``: protein-identification top-1 accuracy of the fc2 (global) and
  fc1 (local) heads on the test crops, beside chance (1 / proteins);
- ``family_first``: feature spectra (VQ1 code histograms per protein, paper Fig. 4): the share of
  proteins with one dominant compartment (>= ``--unique``) whose spectrum correlates best with their
  own family's consensus (leave-one-out, paper Fig. 4e);
- ``perplexity1/2``, ``used_codes1/2``: codebook use on the test crops;
- ``train_minutes``, ``img_s``: wall time and training throughput (2 cores unless ``--threads``).

Prints a table and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
import yaml
from sklearn.decomposition import PCA

from protloc.analysis.atlas import atlas, knn_macro_f1
from protloc.analysis.spectrum import consensus_spectra, family_correlation, spectra_from_indices
from protloc.data.datasets import CropDataset
from protloc.data.io import CropStore, read_table
from protloc.data.world.compartments import WEIGHT_COLUMNS
from protloc.eval.embed import embed, read_obsm
from protloc.eval.load import load_cytoself
from protloc.models.cytoself import CytoselfConfig
from protloc.train.cytoself import TrainCytoselfConfig, train_cytoself
from protloc.train.loop import cpu_has_bf16, cpu_name, resolve_precision

Cfg = TrainCytoselfConfig


def _with(cfg: Cfg, *, model=None, data=None, optim=None, schedule=None, **top) -> Cfg:
    return dataclasses.replace(
        cfg,
        model=cfg.model.replace(**(model or {})),
        data=dataclasses.replace(cfg.data, **(data or {})),
        optim=dataclasses.replace(cfg.optim, **(optim or {})),
        schedule=dataclasses.replace(cfg.schedule, **(schedule or {})),
        **top,
    )


def _uniform(cfg: Cfg) -> Cfg:
    """Uniformly shuffled batches over the whole training split (kept in memory), bf16."""
    return _with(cfg, data={"shuffle": "random", "in_memory": True}, mixed_precision="bf16")


def _cosine(cfg: Cfg, lr: float = 1e-3) -> Cfg:
    """Adam at ``lr`` with 2% linear warm-up and cosine decay to 0 over the budget (set in _run_variant)."""
    return _with(cfg, optim={"lr": lr}, schedule={"lr_decay": "cosine"})


def _small(cfg: Cfg) -> Cfg:
    return dataclasses.replace(cfg, model=CytoselfConfig.small())


# name -> (what changes, config from the tiny recipe). The tiny recipe is the shipped cytoself-tiny's:
# Adam 4e-4, batch 32, chunk-window shuffling, plateau schedule, float32. Names add levers left to right.
VARIANTS: dict[str, tuple[str, Callable[[Cfg], Cfg]]] = {
    "tiny": ("the shipped tiny recipe (float32, chunk-window batches)", lambda c: c),
    "tiny-bf16": ("tiny, bf16 autocast", lambda c: _with(c, mixed_precision="bf16")),
    "tiny-lr1e-3": ("tiny bf16, Adam 1e-3", lambda c: _with(c, optim={"lr": 1e-3}, mixed_precision="bf16")),
    "tiny-bs64": ("tiny bf16, batch 64", lambda c: _with(c, data={"batch_size": 64}, mixed_precision="bf16")),
    "tiny-uniform": ("tiny bf16, uniformly shuffled batches", _uniform),
    "tiny-uniform-noid": (
        "tiny-uniform without the protein-ID pretext task",
        lambda c: _with(_uniform(c), model={"use_fc": False}),
    ),
    "tiny-uniform-cosine": ("tiny-uniform, Adam 1e-3 warm-up + cosine", lambda c: _cosine(_uniform(c))),
    "small": ("the small preset, bf16, chunk-window batches", lambda c: _with(_small(c), mixed_precision="bf16")),
    "small-uniform": ("the small preset, bf16, uniformly shuffled batches", lambda c: _uniform(_small(c))),
    "small-uniform-cosine": ("small-uniform, Adam 1e-3 warm-up + cosine", lambda c: _cosine(_uniform(_small(c)))),
    "small-uniform-cosine-noid": (
        "small-uniform-cosine without the protein-ID pretext task",
        lambda c: _with(_cosine(_uniform(_small(c))), model={"use_fc": False}),
    ),
}


def _labels(world: Path, unique: float) -> tuple[pd.DataFrame, dict[str, str], dict[str, str]]:
    truth = read_table(world / "truth.csv")
    truth["protein_id"] = truth["protein_id"].astype(str)
    cols = [c for c in WEIGHT_COLUMNS if c in truth.columns]
    w = truth[cols].to_numpy(dtype=float)
    keep = w.max(axis=1) >= unique
    demo = dict(zip(truth["protein_id"], truth["label"].astype(str), strict=True))
    uniq = {p: (lab if k else "") for (p, lab), k in zip(demo.items(), keep, strict=True)}
    return truth.set_index("protein_id")[cols], demo, uniq


def _knn(features: np.ndarray, obs: pd.DataFrame, column: str) -> dict:
    return knn_macro_f1(features, obs[column].to_numpy(), groups=obs["protein_id"].to_numpy())


def _scores(features: np.ndarray, obs: pd.DataFrame, *, seed: int, umap: bool = True) -> dict:
    demo, uniq = _knn(features, obs, "label"), _knn(features, obs, "label_unique")
    row = {
        "knn_f1": demo["macro_f1"],
        "knn_acc": demo["accuracy"],
        "knn_f1_unique": uniq["macro_f1"],
        "per_class_f1": demo["per_class_f1"],
    }
    if umap:
        adata = ad.AnnData(obs=obs[["protein_id", "label"]].reset_index(drop=True))
        adata.obs.index = adata.obs.index.astype(str)
        adata.obsm["rep"] = features.astype(np.float32)
        res = atlas(adata, use_rep="rep", split=None, random_state=seed)
        row["score"] = res["clustering_score"]["localization"]
        row["score_prot"] = res["clustering_score"]["localization_by_protein"]
    return row


def _raw(store: CropStore, rows: np.ndarray, channels: list[str]) -> np.ndarray:
    out = []
    for s in range(0, len(rows), 512):
        d = store.read(rows[s : s + 512], channels=channels)
        out.append(np.concatenate([np.asarray(d[c], np.float32).reshape(len(d[c]), -1) for c in channels], 1))
    return np.concatenate(out)


@torch.no_grad()
def _id_accuracy(run: Path, store: CropStore, test: np.ndarray) -> dict:
    """Top-1 protein-ID accuracy of fc1 / fc2 on the test crops (eval mode, no augmentation)."""
    model = load_cytoself(run)
    if model.fc1 is None:
        return {}
    label_map = json.loads((run / "label_map.json").read_text())
    ds = CropDataset(store, split="test", channels=model.config.channels, label_map=label_map)
    hits = np.zeros(2)
    n = 0
    for s in range(0, len(ds), 256):
        batch = ds.read_batch(np.arange(s, min(s + 256, len(ds))))
        out = model(batch["image"])
        y = batch["label"]
        ok = y >= 0
        hits += [(out.logits1.argmax(1) == y)[ok].sum().item(), (out.logits2.argmax(1) == y)[ok].sum().item()]
        n += int(ok.sum())
    return {"id_top1_local": hits[0] / n, "id_top1_global": hits[1] / n, "id_chance": 1 / len(label_map)}


def _codebook(indices: np.ndarray, size: int) -> tuple[float, int]:
    counts = np.bincount(indices.reshape(-1), minlength=size).astype(float)
    p = counts / counts.sum()
    nz = p[p > 0]
    return float(np.exp(-(nz * np.log(nz)).sum())), int((counts > 0).sum())


def _family_first(local_idx: np.ndarray, obs: pd.DataFrame, size: int) -> dict:
    """Share of dominant-compartment proteins whose spectrum ranks their own family first (Fig. 4e)."""
    spectra = spectra_from_indices(local_idx, obs["protein_id"].to_numpy(), codebook_size=size)
    labels = obs.drop_duplicates("protein_id").set_index("protein_id")["label"]
    consensus = consensus_spectra(spectra, labels)
    dominant = obs.loc[obs["label_unique"] != "", ["protein_id", "label"]].drop_duplicates("protein_id")
    first = []
    for p, lab in zip(dominant["protein_id"], dominant["label"], strict=True):
        if lab not in consensus.index or len(consensus.attrs["members"][lab]) < 2:
            continue  # a family needs another member to compare with
        first.append(family_correlation(p, consensus, spectra=spectra).index[0] == lab)
    return {"family_first": float(np.mean(first)) if first else float("nan"), "family_proteins": len(first)}


def _run_variant(name: str, args: argparse.Namespace, store_path: Path, test_obs: pd.DataFrame) -> dict:
    what, make = VARIANTS[name]
    # "+fields" variants train on a second world of the same proteins (--fields-prepared: other fields
    # of view, another seed); the scores still come from the demo world's held-out test fields.
    train_store = store_path
    if name.endswith("+fields"):
        if args.fields_prepared is None:
            raise SystemExit(f"variant {name!r} needs --fields-prepared (a prepared world of more fields)")
        train_store = args.fields_prepared / "cytoself.zarr"
        what += f"; trained on {args.fields_prepared}"
    base = TrainCytoselfConfig.tiny(store=str(train_store))
    cfg = make(base)
    steps = max(1, args.images // cfg.data.batch_size)
    # Eight validation checks on a fixed 40-batch subset: enough to pick the best checkpoint.
    sched = dataclasses.replace(
        cfg.schedule,
        max_steps=steps,
        eval_every=max(steps // 8, 1),
        eval_batches=40,
        log_every=50,
        warmup_steps=steps // 50 if cfg.schedule.lr_decay == "cosine" else 0,
    )
    cfg = dataclasses.replace(cfg, schedule=sched, seed=args.seed, save_every=max(steps // 8, 1))
    run = args.out / "runs" / name
    done = run / "summary.json"
    if done.is_file():
        summary = json.loads(done.read_text())
    else:
        t0 = time.perf_counter()
        summary = train_cytoself(cfg, run_dir=run, resume=(run / "last").is_dir(), progress=args.progress)
        summary["wall_minutes"] = (time.perf_counter() - t0) / 60
        done.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return _score(name, what, run, summary, args, store_path, test_obs) | {"images": args.images}


def _summary_of(run: Path) -> dict:
    """Steps, throughput and wall time of a run trained elsewhere (``protloc train``), from metrics.jsonl."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    steps = train[-1]["step"]
    img_s = train[-1].get("images_per_s")
    return {
        "steps": steps,
        "best_step": min(val, key=lambda r: r["loss"])["step"] if val else None,
        "images_per_s": img_s,
        "images": steps * cfg["data"]["batch_size"],
        "wall_minutes": steps * cfg["data"]["batch_size"] / img_s / 60 if img_s else float("nan"),
    }


def _precision(run: Path) -> str:
    """The precision the run trained in (what the trainer's accelerator resolved its config to)."""
    asked = yaml.safe_load((run / "config.yaml").read_text()).get("mixed_precision", "no")
    got = resolve_precision(asked, cpu=not torch.cuda.is_available())
    return "fp32" if got == "no" else got


def _score(
    name: str, what: str, run: Path, summary: dict, args: argparse.Namespace, store_path: Path, test_obs: pd.DataFrame
) -> dict:
    emb = args.out / "embeddings" / f"{name}.h5ad"
    emb.parent.mkdir(parents=True, exist_ok=True)
    embed(run, store_path, emb, split="test", overwrite=True, progress=False, include_local=True)
    feats = read_obsm(emb, "global")
    store = CropStore.open(store_path)
    test_rows = np.flatnonzero(store.obs["split"].astype(str).to_numpy() == "test")
    mcfg = load_cytoself(run).config
    p1, u1 = _codebook(read_obsm(emb, "local_indices"), mcfg.codebook_size1)
    p2, u2 = _codebook(read_obsm(emb, "global_indices"), mcfg.codebook_size2)
    row = {
        "method": name,
        "what": what,
        "preset": "small" if mcfg.global_dim != 144 else "tiny",
        "images": summary.get("images"),
        "steps": summary["steps"],
        "best_step": summary.get("best_step"),
        "train_minutes": round(summary.get("wall_minutes", float("nan")), 2),
        "img_s": summary.get("images_per_s"),
        "threads": torch.get_num_threads(),
        "precision": _precision(run),
        "cpu": cpu_name() + (" (native bf16)" if cpu_has_bf16() else ""),
        **_scores(feats, test_obs, seed=args.seed),
        **_id_accuracy(run, store, test_rows),
        **_family_first(read_obsm(emb, "local_indices"), test_obs, mcfg.codebook_size1),
        "perplexity1": p1,
        "used_codes1": u1,
        "perplexity2": p2,
        "used_codes2": u2,
        "codebook_size1": mcfg.codebook_size1,
        "codebook_size2": mcfg.codebook_size2,
    }
    return row


def _baselines(args: argparse.Namespace, store_path: Path, test_obs: pd.DataFrame, weights: pd.DataFrame) -> list:
    store = CropStore.open(store_path)
    obs = store.obs
    test = np.flatnonzero(obs["split"].astype(str).to_numpy() == "test")
    train_rows = np.flatnonzero(obs["split"].astype(str).to_numpy() == "train")
    rng = np.random.default_rng(args.seed)
    fit_rows = np.sort(rng.choice(train_rows, size=min(args.max_train_pca, len(train_rows)), replace=False))
    channels = [c for c in ("protein", "nucleus_distance") if c in store.channels]
    pca = PCA(n_components=args.pca, random_state=args.seed).fit(_raw(store, fit_rows, channels))
    feats = pca.transform(_raw(store, test, channels))
    rows = [
        {
            "method": f"PCA of raw pixels ({args.pca} comp.)",
            "what": "no training",
            **_scores(feats, test_obs, seed=args.seed),
        }
    ]
    truth = weights.loc[test_obs["protein_id"]].to_numpy(dtype=float)
    rows.append(
        {
            "method": "oracle: true compartment weights",
            "what": "each crop = its protein's truth.csv weights",
            **_scores(truth, test_obs, seed=args.seed, umap=False),
        }
    )
    return rows


COLUMNS = [
    ("knn_f1", "kNN F1", "{:.3f}"),
    ("knn_f1_unique", "F1 uniq", "{:.3f}"),
    ("score", "score", "{:.2f}"),
    ("score_prot", "score/p", "{:.2f}"),
    ("id_top1_global", "ID glob", "{:.3f}"),
    ("id_top1_local", "ID loc", "{:.3f}"),
    ("family_first", "family1", "{:.2f}"),
    ("perplexity1", "ppl1", "{:.0f}"),
    ("perplexity2", "ppl2", "{:.0f}"),
    ("img_s", "img/s", "{:.0f}"),
    ("train_minutes", "min", "{:.1f}"),
]


def _print(rows: list[dict]) -> None:
    print(f"{'method':<40}" + "".join(f"{h:>9}" for _, h, _ in COLUMNS))
    for r in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            v = r.get(key)
            cells.append(f"{fmt.format(v):>9}" if isinstance(v, int | float) and np.isfinite(v) else f"{'-':>9}")
        print(f"{r['method']:<40}" + "".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", type=Path, default=Path("runs/demo/prepared"))
    parser.add_argument("--world", type=Path, default=Path("runs/demo/world"))
    parser.add_argument("--out", type=Path, default=Path("runs/cytoself_quality"))
    parser.add_argument("--variants", default="tiny,tiny-noid", help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument(
        "--fields-prepared",
        type=Path,
        default=None,
        help="prepared world of other fields of view of the same proteins, for the '+fields' variants",
    )
    parser.add_argument(
        "--score-run",
        action="append",
        default=[],
        metavar="NAME=RUN",
        help="also score a finished run folder (e.g. the shipped recipe's, trained with protloc train) as row NAME",
    )
    parser.add_argument("--images", type=int, default=64_000, help="training images per variant")
    parser.add_argument("--table", action="store_true", help="only add the baselines and print / write the table")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--unique", type=float, default=0.6, help="min weight of the main compartment")
    parser.add_argument("--pca", type=int, default=144, help="PCA components of the raw-pixel baseline")
    parser.add_argument("--max-train-pca", type=int, default=4000, help="training crops used to fit PCA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/cytoself_quality.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    store_path = args.prepared / "cytoself.zarr"
    store = CropStore.open(store_path)
    weights, demo, uniq = _labels(args.world, args.unique)
    obs = store.obs
    test = np.flatnonzero(obs["split"].astype(str).to_numpy() == "test")
    test_obs = obs.iloc[test][["protein_id", "fov_id"]].copy().reset_index(drop=True)
    test_obs["protein_id"] = test_obs["protein_id"].astype(str)
    test_obs["label"] = [demo.get(p, "") for p in test_obs["protein_id"]]
    test_obs["label_unique"] = [uniq.get(p, "") for p in test_obs["protein_id"]]
    rows_dir = args.out / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)

    for spec in args.score_run:
        name, _, path = spec.partition("=")
        run = Path(path)
        row = _score(name, f"run {run} (trained with protloc train)", run, _summary_of(run), args, store_path, test_obs)
        (rows_dir / f"{name}.json").write_text(json.dumps(row, indent=1) + "\n")
        _print([row])
    if not args.table:
        for name in [v for v in args.variants.split(",") if v]:
            if name.removesuffix("+fields") in VARIANTS and name.endswith("+fields"):
                VARIANTS[name] = VARIANTS[name.removesuffix("+fields")]
            if name not in VARIANTS:
                parser.error(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
            row = _run_variant(name, args, store_path, test_obs)
            tmp = rows_dir / f".{name}.json.tmp"
            tmp.write_text(json.dumps(row, indent=1) + "\n")
            os.replace(tmp, rows_dir / f"{name}.json")
            _print([row])
        return

    rows = [json.loads(p.read_text()) for p in sorted(rows_dir.glob("*.json"))]
    order = {n: i for i, n in enumerate(VARIANTS)}
    rows.sort(key=lambda r: order.get(r["method"], len(order)))
    rows += _baselines(args, store_path, test_obs, weights)
    _print(rows)
    out = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "test_crops": len(test_obs),
        "test_proteins": int(test_obs["protein_id"].nunique()),
        "labelled_unique_proteins": int(test_obs.loc[test_obs["label_unique"] != "", "protein_id"].nunique()),
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
