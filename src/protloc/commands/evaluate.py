"""``protloc evaluate``: image-accuracy tables of CELL-E models on shared crops (paper S.3.7, Tables S.1-S.2).

- :func:`evaluate_models`: checkpoints + a CELL-E crop store -> metrics (tables over proteins and over
  images) and the per-image and per-protein DataFrames, beside the VQGAN ceiling and a sequence baseline;
- :func:`run_evaluate`: the command: those written as ``metrics.json``, ``table.md`` and two CSVs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from protloc._fs import atomic_dir, atomic_write_text
from protloc.commands._output import check_out, write_csv, write_json
from protloc.commands.inputs import check_batch_size, load_celle, resolve_device
from protloc.data.io import CropStore
from protloc.errors import ConfigError, InputError
from protloc.eval.predict import SamplingConfig

logger = logging.getLogger(__name__)

__all__ = ["evaluate_models", "run_evaluate"]

_REFERENCE_ROWS = ("VQGAN ceiling", "sequence baseline")


def _finite(value: Any) -> float | None:
    """A float for JSON: NaN / inf -> None."""
    f = float(value)
    return f if np.isfinite(f) else None


def _metric_table(table: Mapping[str, tuple[float, float]]) -> dict[str, list[float | None]]:
    return {name: [_finite(mean), _finite(sd)] for name, (mean, sd) in table.items()}


def _ordered_columns(columns: Sequence[str], metrics: Sequence[str]) -> list[str]:
    """``model``, the identifier columns, the metrics in table order, then the rest (``n_images`` last)."""
    first = [c for c in ("model", "protein_id", "index", "view") if c in columns]
    middle = [c for c in metrics if c in columns]
    rest = [c for c in columns if c not in first and c not in middle and c != "n_images"]
    return [*first, *middle, *rest, *(["n_images"] if "n_images" in columns else [])]


def _model_names(checkpoints: Sequence[Path], names: Sequence[str] | None) -> list[str]:
    """Row names of the models: ``names`` as given, else ``CELL-E`` (one model) or the folder names."""
    if names is not None:
        out = [str(n) for n in names]
        if len(out) != len(checkpoints):
            raise InputError(f"give one --name per --checkpoint ({len(checkpoints)} checkpoint(s), {len(out)} name(s))")
        if any(not n.strip() for n in out):
            raise InputError("model names must not be empty")
    elif len(checkpoints) == 1:
        out = ["CELL-E"]
    else:
        out = []
        for ckpt in checkpoints:
            base = ckpt.resolve().name or str(ckpt)
            if base in ("best", "last"):  # a checkpoint folder inside a run: name it after the run
                base = f"{ckpt.resolve().parent.name}/{base}"
            name, k = base, 1
            while name in out:
                k += 1
                name = f"{base} ({k})"
            out.append(name)
    seen: set[str] = set()
    for n in out:
        if n in seen:
            raise InputError(f"model name {n!r} is given twice (names must be unique)")
        if n in _REFERENCE_ROWS:
            raise InputError(f"model name {n!r} is reserved for a reference row")
        seen.add(n)
    return out


def _check_options(
    checkpoints: Sequence[str | os.PathLike],
    names: Sequence[str] | None,
    sampling: SamplingConfig | None,
    batch_size: Any,
    max_crops: Any,
) -> tuple[list[Path], list[str], SamplingConfig]:
    """The checkpoints, row names and sampling of an evaluation, or the error of a bad option."""
    ckpts = [Path(c) for c in checkpoints]
    if not ckpts:
        raise InputError("give at least one checkpoint to evaluate")
    row_names = _model_names(ckpts, names)
    sampling = sampling or SamplingConfig()
    if sampling.samples != 1:
        raise ConfigError(
            f"evaluate makes one prediction per image: sampling.samples must be 1, got {sampling.samples}"
        )
    check_batch_size(batch_size)
    if max_crops is not None and (isinstance(max_crops, bool) or not isinstance(max_crops, int) or max_crops < 1):
        raise ConfigError(f"max_crops must be a positive integer or None, got {max_crops!r}")
    return ckpts, row_names, sampling


def evaluate_models(
    checkpoints: Sequence[str | os.PathLike],
    *,
    store: str | os.PathLike,
    names: Sequence[str] | None = None,
    sequences: str | os.PathLike | Mapping[str, str] | None = None,
    split: str | None = "val",
    max_crops: int | None = None,
    seed: int = 0,
    augment: bool = True,
    ceiling: bool = True,
    baseline: bool = True,
    train_split: str = "train",
    batch_size: int = 8,
    sampling: SamplingConfig | None = None,
    device: str | None = "cpu",
    precision: str = "fp32",
    embedder_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """Score CELL-E models on the same crops, beside the VQGAN ceiling and a sequence-only baseline (S.3.7).

    S.3.7: "we generated a single prediction per image found in the OpenCell set. Each image was randomly
    cropped and flipped similar to training, but cropped regions and flips were maintained between
    models." Every model (:func:`~protloc.eval.evaluate.evaluate_celle`) sees the same crops and flips
    (they are a hash of ``seed`` and the crop index, given the same image / crop size), and so do the
    reference rows: the VQGAN ceiling (:func:`~protloc.eval.evaluate.vqgan_ceiling`) of the *first*
    model's threshold tokenizer and the sequence-only baseline
    (:func:`~protloc.eval.evaluate.sequence_baseline`, fitted on ``train_split`` with the first model's
    crop geometry). Every model samples its tokens with the same :class:`~protloc.eval.predict.SamplingConfig`.

    Parameters
    ----------
    checkpoints
        ``protloc train celle`` run folders (``best/``, else ``last/``) or checkpoint folders.
    store
        The CELL-E crop store (``celle.zarr`` of ``protloc prepare``).
    names
        Row names, one per checkpoint (default: ``CELL-E`` for one model, else the folder names).
    sequences
        FASTA or ``protein_id`` / ``sequence`` table, or a mapping; ``None``: ``sequences.fasta`` (else
        ``proteins.csv``) beside the store.
    split
        Crops to evaluate (``None``: every crop).
    max_crops
        At most this many crops (a seeded subsample shared by all rows); ``None``: all.
    seed
        Seed of the crop offsets / flips and of the subsample.
    augment
        Random crops and flips as in training (S.3.7); False: centre crops, no flips.
    ceiling, baseline
        Add the VQGAN-ceiling / sequence-baseline rows.
    train_split
        Split the sequence baseline is fitted on.
    batch_size
        Crops per forward pass (the sampled tokens depend on it, the crops do not).
    sampling
        :class:`~protloc.eval.predict.SamplingConfig` of every model (one prediction per image: ``samples``
        must be 1).
    device
        Torch device (``None``: CUDA when available).
    precision
        ``"fp32"``, ``"bf16"`` or ``"int8"`` transformer weights (:func:`~protloc.eval.load.set_precision`).
    embedder_path
        ESM-2 / TAPE weights to use instead of the path recorded at training time (when the weights moved);
        ignored by models with one-hot / descriptor / learned residues.
    progress
        Show progress bars.

    Returns
    -------
    metrics : dict
        ``proteins`` and ``images`` (row name -> metric -> ``[mean, sd]``, over proteins -- every protein
        counts once -- and over images, the paper's convention; ``None`` for an undefined value),
        ``models`` (per row: checkpoint, step, images, proteins, seconds, ...), ``settings``,
        ``same_crops``, ``table`` / ``table_images`` (the markdown tables of
        :func:`~protloc.eval.evaluate.format_table`).
    per_image : pandas.DataFrame
        Every row's per-image metrics, with a ``model`` column first.
    per_protein : pandas.DataFrame
        Per-protein means, with a ``model`` column first.

    Raises
    ------
    InputError
        A missing store / checkpoint / sequence file, a ``names`` count that differs from the
        checkpoints, duplicate names, a protein without a sequence.
    ConfigError
        Invalid sampling settings, batch size or ``max_crops``.
    """
    from protloc.data.sequences import default_sequences, read_sequences
    from protloc.eval.evaluate import (
        METRICS,
        EvaluationResult,
        evaluate_celle,
        format_table,
        sequence_baseline,
        vqgan_ceiling,
    )

    ckpts, row_names, sampling = _check_options(checkpoints, names, sampling, batch_size, max_crops)
    crops = CropStore.open(store)
    for ckpt in ckpts:
        if not ckpt.exists():
            raise InputError("checkpoint not found (give a `protloc train celle` run or checkpoint folder)", path=ckpt)
    if sequences is None:
        seq_source: str = str(default_sequences(Path(crops.path)))
        seqs = read_sequences(seq_source)
    elif isinstance(sequences, Mapping):
        seq_source = "mapping"
        seqs = {str(k): str(v) for k, v in sequences.items()}
    else:
        seq_source = str(sequences)
        seqs = read_sequences(sequences)
    device = resolve_device(device)
    common: dict[str, Any] = dict(
        split=split, max_crops=max_crops, augment=augment, seed=seed, batch_size=batch_size, progress=progress
    )

    results: dict[str, EvaluationResult] = {}
    models: dict[str, dict[str, Any]] = {}
    loaded: dict[Path, Any] = {}
    first_run = None
    for name, ckpt in zip(row_names, ckpts, strict=True):
        t0 = time.perf_counter()
        key = ckpt.resolve()
        if key not in loaded:  # the same run twice is loaded once
            loaded[key] = load_celle(ckpt, device=device, precision=precision, embedder_path=embedder_path)
        run = loaded[key]
        if first_run is None:
            first_run = run
        res = evaluate_celle(run, crops, sequences=seqs, sampling=sampling, **common)
        results[name] = res
        models[name] = {
            "kind": "CELL-E",
            "checkpoint": str(run.checkpoint.resolve()),
            "step": run.extra.get("step"),
            "mode": "autoregressive" if run.model.autoregressive else "masked",
            "image_size": run.image_size,
            "crop_size": res.info.get("crop_size"),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        logger.info("evaluated %s on %d crops in %.1f s", name, len(res.per_image), models[name]["seconds"])
    assert first_run is not None
    rows: dict[str, EvaluationResult] = {}
    if ceiling:
        t0 = time.perf_counter()
        rows["VQGAN ceiling"] = vqgan_ceiling(first_run, crops, sequences=seqs, **common)
        models["VQGAN ceiling"] = {
            "kind": "VQGAN ceiling",
            "checkpoint": str(first_run.checkpoint.resolve()),
            "tokenizer": (first_run.extra.get("tokenizers") or {}).get("threshold"),
            "image_size": first_run.image_size,
            "crop_size": rows["VQGAN ceiling"].info.get("crop_size"),
            "seconds": round(time.perf_counter() - t0, 3),
        }
    rows.update(results)
    if baseline:
        t0 = time.perf_counter()
        base = sequence_baseline(
            crops,
            sequences=seqs,
            train_split=train_split,
            image_size=first_run.image_size,
            crop_size=int(first_run.extra.get("crop_size") or 0),
            **common,
        )
        rows["sequence baseline"] = base
        models["sequence baseline"] = {
            "kind": "sequence baseline",
            "features": base.info.get("features"),
            "alpha": _finite(base.info.get("alpha", float("nan"))),
            "train_split": train_split,
            "train_proteins": base.info.get("train_proteins"),
            "train_crops": base.info.get("train_crops"),
            "image_size": base.info.get("image_size"),
            "crop_size": base.info.get("crop_size"),
            "seconds": round(time.perf_counter() - t0, 3),
        }
    for name, res in rows.items():
        models[name]["images"] = len(res.per_image)
        models[name]["proteins"] = len(res.per_protein)
    models = {name: models[name] for name in rows}  # row order

    reference = next(iter(rows.values())).per_image[["index", "view"]].reset_index(drop=True)
    same_crops = all(r.per_image[["index", "view"]].reset_index(drop=True).equals(reference) for r in rows.values())
    if not same_crops:
        logger.warning("the rows were evaluated on different crops (different image or crop sizes?)")

    settings = {
        "store": str(Path(crops.path).resolve()),
        "sequences": seq_source,
        "split": split,
        "max_crops": max_crops,
        "seed": int(seed),
        "augment": bool(augment),
        "batch_size": batch_size,
        "sampling": {k: v for k, v in dataclasses.asdict(sampling).items() if k != "samples"},
        "ceiling": bool(ceiling),
        "baseline": bool(baseline),
        "device": str(device),
        "precision": precision,
    }
    metrics: dict[str, Any] = {
        "proteins": {name: _metric_table(r.table) for name, r in rows.items()},
        "images": {name: _metric_table(r.table_images) for name, r in rows.items()},
        "models": models,
        "settings": settings,
        "same_crops": bool(same_crops),
        "table": format_table(rows, over="proteins"),
        "table_images": format_table(rows, over="images"),
    }
    per_image = pd.concat([r.per_image.assign(model=name) for name, r in rows.items()], ignore_index=True, sort=False)
    per_image = per_image[_ordered_columns(per_image.columns, METRICS)]
    per_protein = pd.concat(
        [r.per_protein.reset_index().assign(model=name) for name, r in rows.items()], ignore_index=True, sort=False
    )
    per_protein = per_protein[_ordered_columns(per_protein.columns, METRICS)]
    return metrics, per_image, per_protein


def run_evaluate(
    *,
    checkpoints: Sequence[str | os.PathLike],
    store: str | os.PathLike,
    out: str | os.PathLike,
    names: Sequence[str] | None = None,
    sequences: str | os.PathLike | Mapping[str, str] | None = None,
    split: str | None = "val",
    max_crops: int | None = None,
    seed: int = 0,
    augment: bool = True,
    ceiling: bool = True,
    baseline: bool = True,
    train_split: str = "train",
    batch_size: int = 8,
    sampling: SamplingConfig | None = None,
    device: str | None = "cpu",
    precision: str = "fp32",
    embedder_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Image-accuracy tables of CELL-E models on shared crops (paper S.3.7, Tables S.1-S.2): ``protloc evaluate``.

    Computes :func:`evaluate_models` and writes into ``out`` (a folder written beside it and moved into
    place when complete):

    - ``metrics.json``: the metrics of :func:`evaluate_models` and ``seconds``; this is what is returned;
    - ``table.md``: :func:`~protloc.eval.evaluate.format_table` over proteins, then over images;
    - ``per_image.csv``: every row's per-image metrics, with a ``model`` column first;
    - ``per_protein.csv``: per-protein means, with a ``model`` column first.

    Parameters
    ----------
    out
        Output folder; an existing non-empty one is refused unless ``overwrite`` (then it is replaced).
    overwrite
        Replace an existing non-empty ``out``.

    The other parameters are those of :func:`evaluate_models`; ``sampling`` (one prediction per image) is
    the ``--temperature``, ``--top-k-fraction``, ``--steps`` and ``--sampling-seed`` of the command line.

    Raises
    ------
    InputError
        A missing store / checkpoint / sequence file, a ``names`` count that differs from the
        checkpoints, duplicate names, an existing output, a protein without a sequence.
    ConfigError
        Invalid sampling settings, batch size or ``max_crops``.
    """
    t_start = time.perf_counter()
    _check_options(checkpoints, names, sampling, batch_size, max_crops)
    out = check_out(
        out, overwrite=overwrite, inputs={"--checkpoint": list(checkpoints), "--store": store, "--sequences": sequences}
    )
    metrics, per_image, per_protein = evaluate_models(
        checkpoints,
        store=store,
        names=names,
        sequences=sequences,
        split=split,
        max_crops=max_crops,
        seed=seed,
        augment=augment,
        ceiling=ceiling,
        baseline=baseline,
        train_split=train_split,
        batch_size=batch_size,
        sampling=sampling,
        device=device,
        precision=precision,
        embedder_path=embedder_path,
        progress=progress,
    )
    n_crops = next(iter(metrics["models"].values()))["images"]  # the crops every row saw
    with atomic_dir(out) as tmp:
        summary = {**metrics, "seconds": round(time.perf_counter() - t_start, 3)}
        note = (
            f"split {split or 'all'}, {n_crops} crops, seed {seed}, "
            f"{'random crops and flips shared across models' if augment else 'centre crops'} (S.3.7)\n"
        )
        atomic_write_text(
            tmp / "table.md",
            f"# Evaluation\n\n{note}\n## Mean +- sd over proteins\n\n{metrics['table']}\n"
            f"## Mean +- sd over images\n\n{metrics['table_images']}",
        )
        write_csv(per_image, tmp / "per_image.csv")
        write_csv(per_protein, tmp / "per_protein.csv")
        write_json(tmp / "metrics.json", summary)
    logger.info("evaluation of %d row(s) written to %s in %.1f s", len(metrics["models"]), out, summary["seconds"])
    return summary
