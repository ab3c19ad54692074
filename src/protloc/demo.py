"""``protloc demo`` / ``make demo``: both papers' main results on the reference cell world, in one run.

Stages, each written atomically into its own folder under ``out`` and skipped when a previous run of
the same settings already finished it (so an interrupted demo resumes where it stopped):

==============  =====================================================================================
``world``       the reference cell world (all 384 proteins x 4 fields of view, seed 0 by default)
``prepared``    its cytoself crop store (``protloc prepare``)
``celle_world`` CELL-E's world: proteins of the shipped human table (``protloc world make --mode
                proteome``) with their homology partition; held-out (test-partition) proteins only
                (and as many train-partition ones for the sequence-only baseline) unless ``train``
``celle_prepared``  its CELL-E crop store, split by the partition
``train``       only with ``train=True``: cytoself, both VQGANs and CELL-E from the shipped recipes
``cytoself``    cytoself embeddings of the test crops (``embeddings.h5ad``)
``atlas``       UMAP atlas, clustering score, k-NN macro-F1 (cytoself Fig. 2)
``spectrum``    feature spectra, biclustering, family correlation of one protein (cytoself Fig. 4)
``interpret``   feature zeroing of that protein's strongest codes (cytoself Fig. 5)
``evaluate``    CELL-E on held-out proteins beside its ablations, the VQGAN ceiling and a sequence-only baseline
``gallery``     predictions for held-out proteins: nucleus, truth, predicted threshold, probability map
``constructs``  GFP vs GFP + NLS vs GFP + random peptide on several nuclei (CELL-E Fig. 4)
``screens``     an NLS insertion scan along GFP and the residue attention of GFP + NLS (Fig. 4-6)
``report``      ``report/index.html`` (one self-contained file), PNGs and ``metrics.json``
==============  =====================================================================================

Without ``train`` the models are the shipped weights (:mod:`protloc.pretrained`): cytoself trained on the
default world's training fields, CELL-E on the train partition of a 4,400-protein proteome world. The
CELL-E stages use test-partition proteins only: no protein homologous to one of them was trained on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from protloc._fs import atomic_dir, atomic_path, atomic_write_json, atomic_write_text
from protloc.errors import ConfigError, InputError
from protloc.pretrained import pretrained_path, read_recipe

logger = logging.getLogger(__name__)

__all__ = ["DEMO_STAGES", "DemoConfig", "run_demo"]

DEMO_STAGES = (
    "world",
    "prepared",
    "celle_world",
    "celle_prepared",
    "train",
    "cytoself",
    "atlas",
    "spectrum",
    "interpret",
    "evaluate",
    "gallery",
    "constructs",
    "screens",
    "report",
)

#: The world the shipped weights were trained on (``protloc/weights/*/recipe.json``).
SHIPPED_WORLD = {"proteins": None, "fovs": 4, "seed": 0}

#: The engineered constructs of CELL-E Fig. 4 (``engineered.fasta`` of the reference world).
CONSTRUCTS = ("GFP", "GFP_NLS_nucleoplasmin", "GFP_NLS_NMyc", "GFP_random_peptide")
NLS_NUCLEOPLASMIN = "KRPAATKKAGQAKKKK"

#: The shipped ablations evaluated beside the shipped CELL-E (row name -> shipped weights), same crops.
ABLATIONS = {"CELL-E one-hot": "celle-tiny-onehot", "no sequence": "celle-tiny-noseq"}

#: The split of the CELL-E stages: the homology partition's test proteins.
HELD_OUT = "test"

# Preferred localization of the protein whose spectrum and feature zeroing are shown.
_QUERY_LABELS = ("nucleolus", "nuclear_envelope", "mitochondria", "golgi")


@dataclass(frozen=True)
class DemoConfig:
    """Settings of ``protloc demo``.

    Attributes
    ----------
    proteins, fovs, seed
        Reference world: proteins (``None`` = all 384), fields of view per protein, seed. The shipped
        weights were trained on the default (``None``, 4, 0); other values need ``train`` (or
        ``allow_mismatch`` for a quick look, with a warning in the report that held-out proteins may have
        been seen in training).
    workers
        Processes for building the world and preparing crops.
    train
        Train the four models from the shipped recipes instead of using the shipped weights.
    train_scale
        Multiply every training schedule (steps, evaluation interval, discriminator start) by this; 1 = the
        recipes the shipped weights came from.
    allow_mismatch
        Use the shipped weights on a world other than the one they were trained on.
    thumbnails
        Atlas hover thumbnails.
    eval_crops
        Held-out crops of the CELL-E evaluation (``None``: all).
    gallery
        Held-out proteins in the prediction gallery.
    samples
        Draws per prediction in the gallery, the constructs and the screens.
    construct_nuclei
        Nucleus images of the construct experiment.
    celle_proteins, celle_train_proteins, celle_fovs
        CELL-E's world: proteins drawn from the human table -- with the shipped weights ``celle_proteins``
        of the test partition (evaluated) and as many of the train partition (they fit the sequence-only
        baseline), with ``train`` ``celle_train_proteins`` of all partitions -- and fields of view per
        protein.
    device, precision
        Torch device and CELL-E precision (``fp32``, ``bf16``, ``int8``).
    """

    proteins: int | None = None
    fovs: int = 4
    seed: int = 0
    workers: int = 2
    train: bool = False
    train_scale: float = 1.0
    allow_mismatch: bool = False
    thumbnails: int = 600
    eval_crops: int | None = 400
    gallery: int = 8
    samples: int = 8
    construct_nuclei: int = 8
    celle_proteins: int = 300
    celle_train_proteins: int = 2400
    celle_fovs: int = 2
    device: str = "cpu"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.proteins is not None and self.proteins < 2:
            raise ConfigError(f"proteins must be at least 2 (or None for all), got {self.proteins}")
        for name in ("fovs", "workers", "thumbnails", "gallery", "samples", "construct_nuclei", "celle_fovs"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("celle_proteins", "celle_train_proteins"):
            if int(getattr(self, name)) < 2:
                raise ConfigError(f"{name} must be at least 2, got {getattr(self, name)}")
        if self.eval_crops is not None and self.eval_crops < 1:
            raise ConfigError(f"eval_crops must be positive or None, got {self.eval_crops}")
        if not 0 < self.train_scale <= 10:
            raise ConfigError(f"train_scale must be in (0, 10], got {self.train_scale}")

    @property
    def shipped_world(self) -> bool:
        return {"proteins": self.proteins, "fovs": self.fovs, "seed": self.seed} == SHIPPED_WORLD

    def identity(self) -> dict[str, Any]:
        """The settings that decide the outputs (a finished stage is reused only if these match)."""
        d = dataclasses.asdict(self)
        d.pop("workers")
        return d


# ---------------------------------------------------------------------------------------------- stages
class _Stages:
    """Runs stages in order, skipping finished ones, timing each and logging ``[i/n] name``."""

    def __init__(self, out: Path, stages: list[str]) -> None:
        self.names = stages
        self.path = out / "stages.json"
        self.record: dict[str, Any] = {}
        if self.path.is_file():
            try:
                self.record = json.loads(self.path.read_text())
            except ValueError:
                self.record = {}

    def run(self, name: str, done: Callable[[], bool], fn: Callable[[], Any]) -> Any:
        i = self.names.index(name) + 1
        if done():
            logger.info("[%d/%d] %s: done before, reused", i, len(self.names), name)
            self.record.setdefault(name, {})["reused"] = True
            self._save()
            return None
        logger.info("[%d/%d] %s ...", i, len(self.names), name)
        t0 = time.perf_counter()
        result = fn()
        self.record[name] = {"seconds": round(time.perf_counter() - t0, 1), "reused": False}
        self._save()
        return result

    def _save(self) -> None:
        atomic_write_json(self.path, self.record)


def _check_settings(out: Path, config: DemoConfig, fresh: bool) -> None:
    """Refuse to mix outputs of different settings in one folder (a resumed demo must match)."""
    path = out / "demo.json"
    if fresh and out.exists():
        for name in [*DEMO_STAGES, "demo.json", "stages.json"]:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    if path.is_file() and not fresh:
        try:
            before = json.loads(path.read_text()).get("settings", {})
        except ValueError:
            before = {}
        now = json.loads(json.dumps(config.identity()))
        if before and before != now:
            diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise InputError(
                f"this folder holds a demo made with other settings ({', '.join(diff)}); "
                "pass --fresh to start over, or choose another --out",
                path=out,
            )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"settings": config.identity()})


def _scaled(cfg: dict[str, Any], scale: float) -> dict[str, Any]:
    """A training config with every schedule length (steps, evaluation and save intervals, warm-up,
    discriminator start) multiplied by ``scale`` (at least 1 step each)."""
    sched = cfg.get("schedule", {})
    for key in ("max_steps", "eval_every", "warmup_steps"):
        if sched.get(key):
            sched[key] = max(1, round(sched[key] * scale))
    if cfg.get("save_every"):
        cfg["save_every"] = max(1, round(cfg["save_every"] * scale))
    loss = cfg.get("loss", {})
    if loss.get("disc_start"):
        loss["disc_start"] = max(1, round(loss["disc_start"] * scale))
    optim = cfg.get("optim", {})
    if optim.get("warmup_steps"):
        optim["warmup_steps"] = max(1, round(optim["warmup_steps"] * scale))
    return cfg


def _train_models(
    out: Path, prepared: Path, celle_prepared: Path, config: DemoConfig, progress: bool
) -> dict[str, Path]:
    """Train cytoself, both VQGANs and CELL-E from the shipped recipes (resuming a stopped run)."""
    import yaml

    from protloc.commands.train import run_train
    from protloc.config import load_config, save_config
    from protloc.train.celle import TrainCelleConfig
    from protloc.train.cytoself import TrainCytoselfConfig
    from protloc.train.vqgan import TrainVQGANConfig

    train_dir = out / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    runs = {
        "cytoself": train_dir / "cytoself",
        "vqgan_nucleus": train_dir / "vqgan_nucleus",
        "vqgan_threshold": train_dir / "vqgan_threshold",
        "celle": train_dir / "celle",
    }
    celle_paths = {
        "data.store": celle_prepared / "celle.zarr",
        "data.sequences": celle_prepared / "sequences.fasta",
        "tokenizers.nucleus": runs["vqgan_nucleus"],
        "tokenizers.threshold": runs["vqgan_threshold"],
    }
    specs = [
        ("cytoself", "cytoself-small", TrainCytoselfConfig, {"data.store": prepared / "cytoself.zarr"}),
        ("vqgan_nucleus", "vqgan-nucleus-tiny", TrainVQGANConfig, {"data.store": celle_prepared / "celle.zarr"}),
        ("vqgan_threshold", "vqgan-threshold-tiny", TrainVQGANConfig, {"data.store": celle_prepared / "celle.zarr"}),
        ("celle", "celle-tiny", TrainCelleConfig, celle_paths),
    ]
    for key, shipped, cfg_cls, paths in specs:
        run_dir = runs[key]
        if (run_dir / "done.json").is_file():
            logger.info("train %s: finished before, reused", key)
            continue
        recipe = _scaled(read_recipe(shipped)["training_config"], config.train_scale)
        recipe_path = train_dir / f"{key}.recipe.yaml"
        atomic_write_text(recipe_path, yaml.safe_dump(recipe, sort_keys=False))
        cfg = load_config(cfg_cls, path=recipe_path, overrides=[f"{k}={v}" for k, v in paths.items()])
        save_config(cfg, recipe_path)
        resume = (run_dir / "last").is_dir()
        logger.info("train %s (%d steps%s)", key, cfg.schedule.max_steps, ", resuming" if resume else "")
        summary = run_train(cfg, out=run_dir, resume=resume, progress=progress)
        atomic_write_json(run_dir / "done.json", summary)
    return runs


def _models(
    out: Path, config: DemoConfig, prepared: Path, celle_prepared: Path, stages: _Stages, progress: bool
) -> dict[str, Path]:
    if config.train:
        result = stages.run(
            "train",
            lambda: all(
                (out / "train" / k / "done.json").is_file()
                for k in ("cytoself", "vqgan_nucleus", "vqgan_threshold", "celle")
            ),
            lambda: _train_models(out, prepared, celle_prepared, config, progress),
        )
        t = out / "train"
        return result or {k: t / k for k in ("cytoself", "vqgan_nucleus", "vqgan_threshold", "celle")}
    return {"cytoself": pretrained_path("cytoself-small"), "celle": pretrained_path("celle-tiny")}


def _query_protein(obs: Any) -> str:
    """A test protein for the spectrum / feature-zeroing panels: the best-covered one of a distinctive
    compartment (nucleolus first), else the best-covered one."""
    counts = obs.groupby("protein_id", observed=True).size().sort_values(ascending=False, kind="stable")
    if "label" in obs:
        labels = obs.drop_duplicates("protein_id").set_index("protein_id")["label"].astype(str)
        for lab in _QUERY_LABELS:
            hits = [p for p in counts.index if labels.get(p) == lab]
            if hits:
                return str(hits[0])
    return str(counts.index[0])


def _gallery(run: Any, prepared: Path, out: Path, config: DemoConfig, progress: bool) -> dict[str, Any]:
    """Predictions for held-out proteins, one crop each, spread over their localizations."""
    from matplotlib.figure import Figure
    from tqdm.auto import tqdm

    from protloc.data.datasets import CelleDataset
    from protloc.data.sequences import read_sequences
    from protloc.eval.metrics import nucleus_mask, nucleus_proportion
    from protloc.eval.predict import SamplingConfig, predict
    from protloc.plotting.celle import plot_prediction

    full = read_sequences(prepared / "sequences.fasta")
    ds = CelleDataset(
        prepared / "celle.zarr",
        split=HELD_OUT,
        sequences=full,
        image_size=run.image_size,
        max_residues=run.model.config.max_residues,
    )
    picks = _gallery_picks(ds, prepared, config.gallery)
    sampling = SamplingConfig(samples=config.samples, seed=config.seed)
    rows = []
    with atomic_dir(out) as tmp:
        for n, i in enumerate(tqdm(picks, desc="gallery", unit="protein", disable=not progress, dynamic_ncols=True)):
            item = ds[i]
            nuc = item["nucleus"][None].float()
            thr = item["threshold"][None].float()
            res = predict(run, [item["sequence"]], nuc, sampling=sampling)
            prob = res["probability"][0, 0].float().numpy()
            pred = res["threshold"][0, 0].float().numpy()
            mask = nucleus_mask(nuc)
            true_prop = float(nucleus_proportion(thr, mask)[0])
            pred_prop = float(res["nucleus_proportion"][0])
            fig = Figure(figsize=(10.4, 2.9), layout="constrained")
            axes = fig.subplots(1, 4)
            nuc_np = nuc[0, 0].numpy()
            axes[0].imshow(nuc_np, cmap="gray")
            axes[0].set_title("nucleus (input)", fontsize=9)
            axes[1].imshow(thr[0, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            axes[1].set_title(f"truth (nuclear {true_prop:.2f})", fontsize=9)
            axes[2].imshow(pred, cmap="gray", vmin=0, vmax=1)
            axes[2].set_title(f"predicted ({config.samples} samples)", fontsize=9)
            plot_prediction(
                nuc_np, prob, mask=mask[0, 0].numpy(), ax=axes[3], title=f"probability (nuclear {pred_prop:.2f})"
            )
            for ax in axes[:3]:
                ax.set_xticks([])
                ax.set_yticks([])
            protein = str(item["protein_id"])
            fig.suptitle(f"{protein} ({_label_of(prepared, protein) or 'no label'}, held-out protein)", fontsize=10)
            name = f"gallery_{n:02d}.png"
            with atomic_path(tmp / name) as f:
                fig.savefig(f, dpi=100, format="png")
            rows.append(
                {
                    "protein_id": protein,
                    "label": _label_of(prepared, protein),
                    "crop_index": int(ds.crop_index[i]),
                    "length": len(full[protein]),
                    "nucleus_proportion_true": true_prop,
                    "nucleus_proportion_pred": pred_prop,
                    "file": name,
                }
            )
        summary = {"split": HELD_OUT, "samples": config.samples, "seed": config.seed, "items": rows}
        atomic_write_json(tmp / "gallery.json", summary)
    return summary


_LABELS: dict[str, dict[str, str]] = {}


def _label_of(prepared: Path, protein: str) -> str:
    key = str(prepared)
    if key not in _LABELS:
        import pandas as pd

        table = pd.read_csv(prepared / "proteins.csv", dtype=str).fillna("")
        _LABELS[key] = dict(zip(table["protein_id"], table.get("label", pd.Series([""] * len(table))), strict=True))
    return _LABELS[key].get(protein, "")


def _gallery_picks(ds: Any, prepared: Path, n: int) -> list[int]:
    """One crop per protein, cycling over localizations so the gallery shows several compartments."""
    proteins = [str(p) for p in ds.protein_ids]
    first: dict[str, int] = {}
    for i, p in enumerate(proteins):
        first.setdefault(p, i)
    by_label: dict[str, list[int]] = {}
    for p, i in sorted(first.items()):
        by_label.setdefault(_label_of(prepared, p), []).append(i)
    picks: list[int] = []
    queues = [list(v) for _, v in sorted(by_label.items())]
    while len(picks) < n and any(queues):
        for q in queues:
            if q and len(picks) < n:
                picks.append(q.pop(0))
    return picks


def _constructs(run: Any, prepared: Path, out: Path, config: DemoConfig, progress: bool) -> dict[str, Any]:
    import torch

    from protloc.analysis.screens import construct_experiment
    from protloc.data.datasets import CelleDataset
    from protloc.data.sequences import read_sequences
    from protloc.data.world.assets import load_engineered_records
    from protloc.eval.predict import SamplingConfig
    from protloc.plotting.screens import plot_constructs

    records = {r["id"]: r for r in load_engineered_records()}
    constructs = {k: records[k]["sequence"] for k in CONSTRUCTS}
    ds = CelleDataset(
        prepared / "celle.zarr",
        split=HELD_OUT,
        sequences=read_sequences(prepared / "sequences.fasta"),
        image_size=run.image_size,
        max_residues=run.model.config.max_residues,
    )
    picks = np.linspace(0, len(ds) - 1, min(config.construct_nuclei, len(ds))).astype(int)
    nuclei = torch.stack([ds[int(i)]["nucleus"] for i in picks]).float()
    per_image, summary = construct_experiment(
        run, constructs, nuclei, sampling=SamplingConfig(samples=config.samples, seed=config.seed), progress=progress
    )
    with atomic_dir(out) as tmp:
        with atomic_path(tmp / "per_image.csv") as f:
            per_image.to_csv(f, index=False)
        with atomic_path(tmp / "summary.csv") as f:
            summary.to_csv(f, index=False)
        fig = plot_constructs(per_image, title=f"GFP constructs on {len(picks)} held-out nuclei")
        with atomic_path(tmp / "constructs.png") as f:
            fig.savefig(f, dpi=110, format="png")
        result = {
            "nuclei": [int(i) for i in picks],
            "samples": config.samples,
            "peptides": {k: records[k].get("peptide", "") for k in CONSTRUCTS},
            "rows": summary.to_dict(orient="records"),
        }
        atomic_write_json(tmp / "constructs.json", result)
    return result


def _held_out_nucleus(run: Any, prepared: Path) -> np.ndarray:
    """The nucleus image of the first held-out crop, as the model sees it (``[S, S]`` in [0, 1])."""
    from protloc.data.datasets import CelleDataset
    from protloc.data.sequences import read_sequences

    ds = CelleDataset(
        prepared / "celle.zarr",
        split=HELD_OUT,
        sequences=read_sequences(prepared / "sequences.fasta"),
        image_size=run.image_size,
        max_residues=run.model.config.max_residues,
    )
    return ds[0]["nucleus"][0].float().numpy()


def _screens(checkpoint: Path, nucleus: np.ndarray, out: Path, config: DemoConfig, progress: bool) -> dict[str, Any]:
    from protloc.commands.screen import run_screen
    from protloc.data.world.assets import load_engineered_records
    from protloc.eval.predict import SamplingConfig

    records = {r["id"]: r for r in load_engineered_records()}
    gfp = records["GFP"]["sequence"]
    # a held-out nucleus image (a field of cells, like the training crops) rather than the single reference nucleus
    common = {
        "checkpoint": checkpoint,
        "nucleus": nucleus,
        "device": config.device,
        "precision": config.precision,
        "progress": progress,
    }
    with atomic_dir(out) as tmp:
        insertion = run_screen(
            out=tmp / "nls_scan",
            mode="insert",
            sequence=gfp,
            name="GFP",
            peptides={"NLS": NLS_NUCLEOPLASMIN},
            at=["start", 40, 80, 120, 160, 200, "end"],
            sampling=SamplingConfig(samples=config.samples, seed=config.seed),
            **common,
        )
        attention = run_screen(
            out=tmp / "attention",
            mode="attention",
            sequence=records["GFP_NLS_nucleoplasmin"]["sequence"],
            name="GFP_NLS_nucleoplasmin",
            sampling=SamplingConfig(samples=1, seed=config.seed),
            **common,
        )
    return {"insertion": insertion, "attention": attention}


def _world_stages(
    stages: _Stages,
    world_stage: tuple[str, Path],
    prepare_stage: tuple[str, Path],
    config: DemoConfig,
    progress: bool,
    *,
    world_kwargs: dict[str, Any],
    prepare_overrides: list[str],
) -> None:
    """Two stages: render a world (``protloc world make``, 512 px, the demo's seed) and prepare its crops."""
    from protloc.commands.prepare import run_prepare
    from protloc.data.world.make import make_world

    (world_name, world), (prepare_name, prepared) = world_stage, prepare_stage
    stages.run(
        world_name,
        lambda: (world / "world.json").is_file(),
        lambda: make_world(
            world, seed=config.seed, size=512, workers=config.workers, overwrite=True, progress=progress, **world_kwargs
        ),
    )
    stages.run(
        prepare_name,
        lambda: (prepared / "summary.json").is_file(),
        lambda: run_prepare(
            world / "fovs.csv",
            prepared,
            sequences=world / "sequences.fasta",
            overrides=prepare_overrides,
            workers=config.workers,
            overwrite=True,
            progress=progress,
        ),
    )


def run_demo(
    out: str | os.PathLike = "runs/demo",
    *,
    config: DemoConfig | None = None,
    fresh: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demo (see the module docstring); returns the content of ``report/metrics.json``.

    Parameters
    ----------
    out
        Output folder; a finished stage in it is reused when the settings match.
    config
        :class:`DemoConfig` (default: the shipped-weights demo on the full reference world).
    fresh
        Delete the stages of a previous demo in ``out`` first.
    progress
        Progress bars.

    Raises
    ------
    InputError
        If ``out`` holds a demo of other settings (without ``fresh``), or the shipped weights are asked
        for on another world without ``allow_mismatch``.
    """
    from protloc.commands.atlas import run_atlas
    from protloc.commands.embed import run_embed
    from protloc.commands.evaluate import run_evaluate
    from protloc.commands.interpret import run_interpret
    from protloc.commands.spectrum import run_spectrum
    from protloc.report import build_report

    config = config or DemoConfig()
    out = Path(out)
    if not config.train and not config.shipped_world and not config.allow_mismatch:
        raise ConfigError(
            "the shipped weights were trained on the default reference world (all proteins, 4 fields of view, "
            "seed 0); with other world settings pass --train (or --allow-mismatch for a quick look)"
        )
    _check_settings(out, config, fresh)
    names = [s for s in DEMO_STAGES if config.train or s != "train"]
    stages = _Stages(out, names)
    t_start = time.perf_counter()

    world, prepared = out / "world", out / "prepared"
    _world_stages(
        stages,
        ("world", world),
        ("prepared", prepared),
        config,
        progress,
        world_kwargs={"proteins": config.proteins, "fovs": config.fovs, "mode": "real"},
        prepare_overrides=["celle=false"],
    )
    celle_world, celle_prepared = out / "celle_world", out / "celle_prepared"
    _world_stages(
        stages,
        ("celle_world", celle_world),
        ("celle_prepared", celle_prepared),
        config,
        progress,
        world_kwargs={
            "proteins": config.celle_train_proteins if config.train else config.celle_proteins,
            "fovs": config.celle_fovs,
            "mode": "proteome",
            # The shipped CELL-E trained on the train partition: it is evaluated on test-partition proteins
            # only; the train-partition ones fit the sequence-only baseline of the same evaluation.
            "partitions": None if config.train else {"train": config.celle_proteins, HELD_OUT: config.celle_proteins},
        },
        prepare_overrides=["cytoself=false"],
    )
    models = _models(out, config, prepared, celle_prepared, stages, progress)

    emb = out / "cytoself" / "embeddings.h5ad"
    stages.run(
        "cytoself",
        emb.is_file,
        lambda: run_embed(
            prepared / "cytoself.zarr",
            emb,
            checkpoint=models["cytoself"],
            split="test",
            device=config.device,
            overwrite=True,
            progress=progress,
        ),
    )
    stages.run(
        "atlas",
        lambda: (out / "atlas" / "scores.json").is_file(),
        lambda: run_atlas(
            emb,
            out / "atlas",
            split="test",
            store=prepared / "cytoself.zarr",
            max_thumbnails=config.thumbnails,
            seed=config.seed,
            overwrite=True,
        ),
    )
    import anndata as ad

    backed = ad.read_h5ad(emb, backed="r")
    query = _query_protein(backed.obs)
    backed.file.close()
    stages.run(
        "spectrum",
        lambda: (out / "spectrum" / "spectrum.json").is_file(),
        lambda: run_spectrum(emb, out / "spectrum", queries=[query], overwrite=True),
    )
    stages.run(
        "interpret",
        lambda: any((out / "interpret").glob("feature_zeroing_*.json")),
        lambda: run_interpret(
            models["cytoself"],
            prepared / "cytoself.zarr",
            out / "interpret",
            protein=query,
            split="test",
            device=config.device,
            overwrite=True,
        ),
    )
    stages.run(
        "evaluate",
        lambda: (out / "evaluate" / "metrics.json").is_file(),
        lambda: run_evaluate(
            checkpoints=[models["celle"], *([] if config.train else [pretrained_path(n) for n in ABLATIONS.values()])],
            store=celle_prepared / "celle.zarr",
            out=out / "evaluate",
            names=["CELL-E + encoder", *([] if config.train else list(ABLATIONS))],
            split=HELD_OUT,
            max_crops=config.eval_crops,
            seed=config.seed,
            device=config.device,
            precision=config.precision,
            overwrite=True,
            progress=progress,
        ),
    )
    run_cache: dict[str, Any] = {}

    def celle_run() -> Any:
        if "run" not in run_cache:
            from protloc.eval.load import load_celle_run

            run_cache["run"] = load_celle_run(models["celle"], map_location=config.device, precision=config.precision)
        return run_cache["run"]

    stages.run(
        "gallery",
        lambda: (out / "gallery" / "gallery.json").is_file(),
        lambda: _gallery(celle_run(), celle_prepared, out / "gallery", config, progress),
    )
    stages.run(
        "constructs",
        lambda: (out / "constructs" / "constructs.json").is_file(),
        lambda: _constructs(celle_run(), celle_prepared, out / "constructs", config, progress),
    )
    stages.run(
        "screens",
        lambda: (out / "screens" / "attention" / "summary.json").is_file(),
        lambda: _screens(
            models["celle"], _held_out_nucleus(celle_run(), celle_prepared), out / "screens", config, progress
        ),
    )
    elapsed = time.perf_counter() - t_start
    info = {
        "settings": config.identity(),
        "models": {k: str(v) for k, v in models.items()},
        "weights": "trained here" if config.train else "shipped",
        "mismatch": not config.train and not config.shipped_world,
        "query_protein": query,
        "stages": stages.record,
        "seconds_this_run": round(elapsed, 1),
    }
    metrics = stages.run("report", lambda: False, lambda: build_report(out, info))
    return metrics
