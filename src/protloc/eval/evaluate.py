"""CELL-E evaluation over a split of a crop store: the image-accuracy tables of paper S.3.7 / Tables S.1-S.2.

Three "models" are evaluated on the *same* crops and reported in the same format:

- :func:`evaluate_celle`: a trained CELL-E (:class:`~protloc.eval.load.CelleRun`). S.3.7: "we generated
  a single prediction per image found in the OpenCell set. Each image was randomly cropped and flipped
  similar to training, but cropped regions and flips were maintained between models." One threshold image
  is sampled per crop (:func:`~protloc.eval.predict.generate`) and decoded, together with the 2D
  probability map of Eq. 3 (:func:`~protloc.eval.predict.probability_map`), and scored against the crop's
  target threshold image with :func:`~protloc.eval.metrics.celle_metrics`.
- :func:`vqgan_ceiling`: the target threshold image passed through the protein-threshold VQGAN (encode,
  quantise, decode), the "VQGAN" row / column of Tables S.1 / S.2 ("As CELL-E selects tokens from this
  VQGAN to produce its outputs, these values represent the best possible performance for our model").
- :func:`sequence_baseline`: a sequence-only baseline that is not in the paper, trained in the same
  call: ridge regression of a protein's mean nucleus proportion on the amino-acid (20) and dipeptide (400)
  composition of its sequence. It predicts no image, only the nucleus proportion, so it reports only the
  two metrics derived from it (nucleus proportion accuracy and nuclear localization accuracy).

Identical crops across models
    Crops come from :class:`~protloc.data.datasets.CelleDataset` with ``augment=True``: every crop offset,
    flip (and sequence window of a long protein) is a hash of ``(seed, epoch=0, crop index)``, so two
    evaluations with the same ``seed`` (and image / crop size) see exactly the same images, whatever the
    model, batch size or ``max_crops`` -- the "maintained between models" of S.3.7. ``augment=False``
    gives the deterministic centre crop without flips instead.

Subsampling
    ``max_crops`` keeps the first ``max_crops`` positions of a permutation of the split seeded with
    ``seed`` (then sorted, for chunk-friendly Zarr reads), so a subsample is also shared between models
    evaluated with the same seed, and a larger ``max_crops`` extends a smaller one.

Aggregation
    :class:`EvaluationResult` holds the per-image table, the per-protein means
    (:func:`~protloc.eval.metrics.summarize`) and mean +- sd over proteins (every protein counts once) and
    over images (the paper's format: "mean +- standard deviation", one prediction per image).
    :func:`format_table` renders several results as a markdown table.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from protloc.data.datasets import CelleDataset
from protloc.data.io import CropStore
from protloc.data.sequences import STANDARD
from protloc.errors import ConfigError, InputError
from protloc.eval.metrics import (
    celle_metrics,
    mean_sd_over_images,
    mean_sd_over_proteins,
    nucleus_mask,
    nucleus_proportion,
    summarize,
)
from protloc.eval.predict import SamplingConfig, generate, probability_map

if TYPE_CHECKING:
    from protloc.eval.load import CelleRun

__all__ = [
    "DEFAULT_ALPHAS",
    "ID_COLUMNS",
    "METRICS",
    "METRIC_LABELS",
    "EvaluationResult",
    "evaluate_celle",
    "format_table",
    "select_crops",
    "sequence_baseline",
    "sequence_features",
    "vqgan_ceiling",
]

#: The per-image metrics of S.3.7 / Table S.2, in table order (the keys of :func:`celle_metrics`).
METRICS: tuple[str, ...] = (
    "nucleus_proportion_accuracy",
    "threshold_pixel_accuracy",
    "pdf_pixel_accuracy",
    "ssim",
    "nuclear_localization_correct",
)

#: Column headers of :func:`format_table` (the paper's metric names).
METRIC_LABELS: dict[str, str] = {
    "nucleus_proportion_accuracy": "Nucleus proportion accuracy",
    "threshold_pixel_accuracy": "Predicted threshold pixel accuracy",
    "pdf_pixel_accuracy": "Predicted 2D PDF pixel accuracy",
    "ssim": "SSIM",
    "nuclear_localization_correct": "Nuclear localization accuracy",
    "nucleus_proportion_pred": "Nucleus proportion (predicted)",
    "nucleus_proportion_true": "Nucleus proportion (target)",
}

#: Identifier columns of :attr:`EvaluationResult.per_image` (not metrics).
ID_COLUMNS: tuple[str, ...] = ("protein_id", "index", "view")

_STANDARD_INDEX = {aa: i for i, aa in enumerate(STANDARD)}

#: Default ridge penalties of :func:`sequence_baseline` (10^-2 .. 10^4, half-decade steps).
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-2, 4, 13))


# ------------------------------------------------------------------------------------------------- result
@dataclass
class EvaluationResult:
    """Per-image and aggregated metrics of one model on one set of crops (paper S.3.7).

    Attributes
    ----------
    per_image
        One row per evaluated crop, in store order: ``protein_id``, ``index`` (store row), ``view`` (the
        crop offset + flip code of :class:`~protloc.data.datasets.CelleDataset`; ``(index, view)``
        identifies the images exactly), then one float column per metric (see :data:`METRICS`; a model
        reports the ones it can) and ``nucleus_proportion_pred`` / ``nucleus_proportion_true``.
    per_protein
        :func:`~protloc.eval.metrics.summarize` of the metric columns: index ``protein_id``, the mean of
        each column over the protein's crops, and ``n_images``.
    table
        Metric -> ``(mean, sd)`` over proteins (population sd; every protein counts once).
    table_images
        Metric -> ``(mean, sd)`` over images (population sd; the format of the paper's tables).
    images
        With ``keep_images=True``: CPU ``float32 [N, 1, S, S]`` tensors in ``per_image`` order:
        ``nucleus``, ``target`` (target threshold image) and the model's ``pred_threshold`` (binarised) /
        ``pdf`` (clipped Eq. 3 map in [0, 1]) where it has them; else None.
    info
        Settings of the evaluation (split, seed, augment, sizes, ...) and model-specific extras.
    """

    per_image: pd.DataFrame
    per_protein: pd.DataFrame
    table: dict[str, tuple[float, float]]
    table_images: dict[str, tuple[float, float]]
    images: dict[str, Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> list[str]:
        """The metric columns of :attr:`per_image` (everything but :data:`ID_COLUMNS`)."""
        return [c for c in self.per_image.columns if c not in ID_COLUMNS]

    @classmethod
    def from_per_image(
        cls,
        per_image: pd.DataFrame,
        *,
        images: dict[str, Tensor] | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> EvaluationResult:
        """Aggregate a per-image table (``protein_id``, ``index``, ``view`` + metric columns).

        Parameters
        ----------
        per_image
            One row per crop; see :attr:`per_image`.
        images, info
            Stored as is.

        Returns
        -------
        EvaluationResult
        """
        if per_image.empty:
            raise InputError("no images were evaluated")
        metric_cols = [c for c in per_image.columns if c not in ID_COLUMNS]
        columns = {c: per_image[c].to_numpy(dtype=np.float64) for c in metric_cols}
        per_protein = summarize(columns, per_image["protein_id"].astype(str).tolist())
        return cls(
            per_image=per_image,
            per_protein=per_protein,
            table=mean_sd_over_proteins(per_protein),
            table_images=mean_sd_over_images(columns),
            images=images,
            info=dict(info or {}),
        )


# ------------------------------------------------------------------------------------------------ helpers
def select_crops(n: int, max_crops: int | None, seed: int) -> np.ndarray:
    """Dataset positions to evaluate: all, or the first ``max_crops`` of a seeded permutation (sorted).

    Parameters
    ----------
    n
        Items in the split.
    max_crops
        Keep at most this many (None: all ``n``).
    seed
        Permutation seed; the same ``(n, seed)`` gives nested subsamples for growing ``max_crops``.

    Returns
    -------
    numpy.ndarray
        Sorted ``int64`` positions in ``0..n-1``.
    """
    if max_crops is None or max_crops >= n:
        return np.arange(n, dtype=np.int64)
    if isinstance(max_crops, bool) or int(max_crops) != max_crops or max_crops < 1:
        raise ConfigError(f"max_crops must be a positive integer or None, got {max_crops!r}")
    perm = np.random.default_rng([int(seed), 0x5EED]).permutation(n)
    return np.sort(perm[: int(max_crops)]).astype(np.int64)


def _as_run(run: CelleRun | str | os.PathLike) -> CelleRun:
    from protloc.eval.load import CelleRun, load_celle_run

    if isinstance(run, CelleRun):
        return run
    if isinstance(run, str | os.PathLike):
        return load_celle_run(Path(run))
    raise InputError(f"run must be a CelleRun or the path of a `protloc train celle` run, got {type(run).__name__}")


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def _placeholder_sequences(store: CropStore | str | os.PathLike) -> dict[str, str]:
    """A one-residue sequence per protein of the store (the image-only evaluations never read them)."""
    opened = store if isinstance(store, CropStore) else CropStore.open(store)
    if "protein_id" not in opened.obs.columns:
        raise InputError("the crop table has no 'protein_id' column", path=opened.path)
    return dict.fromkeys(opened.obs["protein_id"].astype(str).unique().tolist(), "M")


def _run_dataset(
    run: CelleRun,
    store: CropStore | str | os.PathLike,
    *,
    sequences: Mapping[str, str],
    split: str | None,
    augment: bool,
    seed: int,
) -> CelleDataset:
    """The dataset a run sees: its image / crop size, sequence window length and evaluation window."""
    extra = run.extra
    return CelleDataset(
        store,
        split=split,
        sequences=sequences,
        image_size=run.image_size,
        crop_size=int(extra.get("crop_size") or 0),
        augment=augment,
        max_residues=run.model.config.max_residues,
        eval_window=str(extra.get("eval_window") or "start"),
        seed=seed,
    )


def _batches(
    dataset: CelleDataset, positions: np.ndarray, batch_size: int, *, progress: bool, desc: str
) -> Iterator[dict[str, Any]]:
    """:meth:`CelleDataset.read_batch` over ``positions`` in chunks, with a tqdm bar."""
    from tqdm.auto import tqdm

    with tqdm(total=int(positions.size), desc=desc, unit="crop", disable=not progress) as bar:
        for start in range(0, positions.size, batch_size):
            chunk = positions[start : start + batch_size]
            yield dataset.read_batch(chunk)
            bar.update(int(chunk.size))


def _frame(ids: dict[str, list[Any]], metrics: dict[str, list[Tensor]]) -> pd.DataFrame:
    data: dict[str, Any] = {
        "protein_id": [str(p) for p in ids["protein_id"]],
        "index": np.asarray(ids["index"], dtype=np.int64),
        "view": np.asarray(ids["view"], dtype=np.int64),
    }
    for name, parts in metrics.items():
        data[name] = torch.cat(parts).detach().to("cpu", torch.float64).numpy()
    return pd.DataFrame(data)


class _Collector:
    """Accumulates ids, per-image metrics and (optionally) images over batches."""

    def __init__(self, keep_images: bool) -> None:
        self.ids: dict[str, list[Any]] = {"protein_id": [], "index": [], "view": []}
        self.metrics: dict[str, list[Tensor]] = {}
        self.images: dict[str, list[Tensor]] | None = {} if keep_images else None

    def add(self, batch: Mapping[str, Any], metrics: Mapping[str, Tensor], **images: Tensor) -> None:
        self.ids["protein_id"].extend(batch["protein_id"])
        self.ids["index"].extend(batch["index"].tolist())
        self.ids["view"].extend(batch["view"].tolist())
        for name, value in metrics.items():
            self.metrics.setdefault(name, []).append(value.detach().float().cpu())
        if self.images is not None:
            for name, value in images.items():
                self.images.setdefault(name, []).append(value.detach().float().cpu())

    def result(self, info: Mapping[str, Any]) -> EvaluationResult:
        images = None if self.images is None else {k: torch.cat(v) for k, v in self.images.items()}
        return EvaluationResult.from_per_image(_frame(self.ids, self.metrics), images=images, info=info)


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


# ------------------------------------------------------------------------------------------------- CELL-E
@torch.no_grad()
def evaluate_celle(
    run: CelleRun | str | os.PathLike,
    store: CropStore | str | os.PathLike,
    *,
    sequences: Mapping[str, str],
    split: str | None = "val",
    max_crops: int | None = None,
    augment: bool = True,
    seed: int = 0,
    sampling: SamplingConfig | None = None,
    batch_size: int = 8,
    progress: bool = True,
    keep_images: bool = False,
) -> EvaluationResult:
    """Score one sampled prediction per crop of a split against its threshold image (paper S.3.7).

    S.3.7: "we generated a single prediction per image found in the OpenCell set. Each image was randomly
    cropped and flipped similar to training, but cropped regions and flips were maintained between
    models." For every crop the sequence (window) and nucleus crop go through the model, one set of
    threshold tokens is sampled (top-k + Gumbel, :func:`~protloc.eval.predict.generate`), and

    - the *predicted threshold image* is the threshold VQGAN's decoding of those tokens (binarised at 0.5
      by the metrics);
    - the *2D PDF* is the probability-weighted decoding of Eq. 3, clipped to [0, 1] and not normalised
      to sum 1 (:func:`~protloc.eval.predict.probability_map` with ``normalize=False``), so that it is
      comparable pixel-wise to a threshold image;

    both are scored by :func:`~protloc.eval.metrics.celle_metrics` against the crop's target threshold
    image, with the nucleus mask of the crop's nucleus image.

    Parameters
    ----------
    run
        A trained CELL-E (:func:`~protloc.eval.load.load_celle_run`) or the path of its run folder. The
        crops have the run's ``image_size`` / ``crop_size`` and sequence window (``max_residues``,
        ``eval_window``).
    store
        The CELL-E crop store (``celle.zarr`` of ``protloc prepare``) or its path.
    sequences
        ``protein_id`` -> amino-acid sequence; every protein of the split needs one.
    split
        ``split`` value of the crops to evaluate (``None``: every crop).
    max_crops
        Evaluate at most this many crops: the first ``max_crops`` of a permutation seeded with ``seed``
        (see :func:`select_crops`); None: all.
    augment
        Random crop offsets and flips as in training (S.3.7), drawn from a hash of ``(seed, crop index)``
        and therefore identical for every model evaluated with this ``seed``. False: centre crops, no
        flips, the ``eval_window`` of long sequences.
    seed
        Seed of the crop draws and of the ``max_crops`` subsample (not of the token sampling).
    sampling
        Temperature, top-k fraction, Gumbel seed and masked-mode steps (default
        :class:`~protloc.eval.predict.SamplingConfig`). ``samples`` is ignored: one prediction per image.
        One generator seeded with ``sampling.seed`` serves all batches, so the tokens depend on
        ``batch_size`` (and on ``max_crops``) but a repeated call gives the same result.
    batch_size
        Crops per forward pass.
    progress
        Show a tqdm progress bar.
    keep_images
        Keep the nucleus, target, predicted threshold and PDF images in :attr:`EvaluationResult.images`.

    Returns
    -------
    EvaluationResult
        ``per_image`` columns: ``protein_id``, ``index``, ``view``, the five :data:`METRICS`,
        ``nucleus_proportion_pred`` (of the PDF) and ``nucleus_proportion_true`` (of the target).

    Raises
    ------
    InputError
        If the store lacks the split, a protein lacks a sequence, or the tokenizers do not fit the model.
    ConfigError
        On a non-positive ``batch_size`` / ``max_crops``.
    """
    run = _as_run(run)
    batch_size = _check_batch_size(batch_size)
    sampling = dataclasses.replace(sampling or SamplingConfig(), samples=1)
    model = run.model
    c = model.config
    if run.nucleus.grid_size != c.grid_size or run.threshold.grid_size != c.grid_size:
        raise InputError(
            f"the tokenizers give {run.nucleus.grid_size} / {run.threshold.grid_size}-token grids at "
            f"{run.image_size} px, the model expects {c.grid_size}"
        )
    dataset = _run_dataset(run, store, sequences=sequences, split=split, augment=augment, seed=seed)
    positions = select_crops(len(dataset), max_crops, seed)
    device = model.to_logits.weight.device
    generator = torch.Generator().manual_seed(sampling.seed)
    g = c.grid_size
    out = _Collector(keep_images)
    for batch in _batches(dataset, positions, batch_size, progress=progress, desc="evaluate celle"):
        nucleus = batch["nucleus"].to(device)
        target = batch["threshold"].to(device)
        b = nucleus.shape[0]
        text = run.encoder(batch["sequence"], batch["add_end"])
        with torch.autocast(device_type=device.type, enabled=False):
            nucleus_tokens = run.nucleus.encode(nucleus)[1].reshape(b, -1)
        result = generate(model, text=text, nucleus=nucleus_tokens, sampling=sampling, generator=generator)
        with torch.autocast(device_type=device.type, enabled=False):
            decoded = run.threshold.decode_indices(result.tokens.reshape(b, g, g)).float()
        pdf = probability_map(run.threshold, result.probs, normalize=False)
        metrics = celle_metrics(pred_threshold=decoded, pdf=pdf, target_threshold=target, nucleus=nucleus)
        out.add(batch, metrics, nucleus=nucleus, target=target, pred_threshold=(decoded >= 0.5).float(), pdf=pdf)
    info = {
        "name": "CELL-E",
        "checkpoint": str(run.checkpoint),
        "split": split,
        "augment": bool(augment),
        "seed": int(seed),
        "max_crops": max_crops,
        "image_size": run.image_size,
        "crop_size": dataset.crop_size,
        "sampling": dataclasses.asdict(sampling),
        "batch_size": batch_size,
    }
    return out.result(info)


# ------------------------------------------------------------------------------------------- VQGAN ceiling
@torch.no_grad()
def vqgan_ceiling(
    run: CelleRun | str | os.PathLike,
    store: CropStore | str | os.PathLike,
    *,
    sequences: Mapping[str, str] | None = None,
    split: str | None = "val",
    max_crops: int | None = None,
    augment: bool = True,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    keep_images: bool = False,
) -> EvaluationResult:
    """The threshold VQGAN's reconstruction of each target threshold image: the ceiling of Table S.2.

    Table S.2: "The VQGAN columns indicate the value of these metrics evaluated on the ground truth
    threshold image passed through the protein threshold VQGAN. As CELL-E selects tokens from this VQGAN
    to produce its outputs, these values represent the best possible performance for our model." Each
    target threshold image is encoded and quantised by the run's threshold VQGAN and its tokens decoded;
    :func:`~protloc.eval.metrics.celle_metrics` with ``pdf=None`` scores the reconstruction (no 2D PDF:
    the binarised reconstruction stands in for it in the nucleus-proportion metrics, and
    ``pdf_pixel_accuracy`` is absent, as in Table S.2).

    Parameters
    ----------
    run
        The CELL-E run (or its path) whose threshold VQGAN and image / crop size are used.
    store, split, max_crops, augment, seed, batch_size, progress, keep_images
        As in :func:`evaluate_celle`: the same ``seed`` gives the same crops as an :func:`evaluate_celle`
        call.
    sequences
        ``protein_id`` -> sequence, as in :func:`evaluate_celle` (they only choose the sequence windows,
        which this evaluation does not use); None: placeholders.

    Returns
    -------
    EvaluationResult
        ``per_image`` columns: ``protein_id``, ``index``, ``view``, ``nucleus_proportion_accuracy``,
        ``threshold_pixel_accuracy``, ``ssim``, ``nuclear_localization_correct``,
        ``nucleus_proportion_pred`` (of the reconstruction), ``nucleus_proportion_true``.
    """
    run = _as_run(run)
    batch_size = _check_batch_size(batch_size)
    seqs = _placeholder_sequences(store) if sequences is None else sequences
    dataset = _run_dataset(run, store, sequences=seqs, split=split, augment=augment, seed=seed)
    positions = select_crops(len(dataset), max_crops, seed)
    vq = run.threshold
    device = _device(vq)
    was_training = vq.training
    vq.eval()
    out = _Collector(keep_images)
    try:
        for batch in _batches(dataset, positions, batch_size, progress=progress, desc="vqgan ceiling"):
            nucleus = batch["nucleus"].to(device)
            target = batch["threshold"].to(device)
            with torch.autocast(device_type=device.type, enabled=False):
                tokens = vq.encode(target)[1]
                recon = vq.decode_indices(tokens).float()
            metrics = celle_metrics(pred_threshold=recon, pdf=None, target_threshold=target, nucleus=nucleus)
            out.add(batch, metrics, nucleus=nucleus, target=target, pred_threshold=(recon >= 0.5).float())
    finally:
        vq.train(was_training)
    info = {
        "name": "VQGAN ceiling",
        "checkpoint": str(run.checkpoint),
        "split": split,
        "augment": bool(augment),
        "seed": int(seed),
        "max_crops": max_crops,
        "image_size": run.image_size,
        "crop_size": dataset.crop_size,
        "batch_size": batch_size,
    }
    return out.result(info)


# --------------------------------------------------------------------------------------- sequence baseline
def sequence_features(sequences: Sequence[str]) -> np.ndarray:
    """Amino-acid (20) and dipeptide (400) composition of each sequence.

    Only the 20 standard residues count (``STANDARD`` order; B, Z, X, U, O and lower-case letters are
    skipped, and a dipeptide counts only when both residues are standard). Each composition is a
    frequency vector summing to 1 (all zeros when the sequence has no standard residue / no standard
    dipeptide).

    Parameters
    ----------
    sequences
        ``N`` amino-acid sequences (the whole sequence, not a window).

    Returns
    -------
    numpy.ndarray
        ``float64 [N, 420]``: columns ``0..19`` the residue frequencies, ``20 + 20 a + b`` the frequency
        of dipeptide ``ab``.
    """
    if isinstance(sequences, str):
        raise InputError("sequences must be a list of strings, got a single string")
    out = np.zeros((len(sequences), 420), dtype=np.float64)
    for row, seq in enumerate(sequences):
        codes = np.fromiter((_STANDARD_INDEX.get(ch, -1) for ch in str(seq)), dtype=np.int64)
        single = codes[codes >= 0]
        if single.size:
            out[row, :20] = np.bincount(single, minlength=20) / single.size
        if codes.size > 1:
            a, b = codes[:-1], codes[1:]
            ok = (a >= 0) & (b >= 0)
            if ok.any():
                out[row, 20:] = np.bincount(20 * a[ok] + b[ok], minlength=400) / int(ok.sum())
    return out


def _crop_proportions(
    dataset: CelleDataset, positions: np.ndarray, batch_size: int, *, progress: bool, desc: str, keep: bool = False
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, dict[str, list[Tensor]]]:
    """Target nucleus proportion of each crop: ``ids, index, view, proportions, images`` (images if ``keep``)."""
    pids: list[str] = []
    index: list[int] = []
    view: list[int] = []
    props: list[Tensor] = []
    images: dict[str, list[Tensor]] = {"nucleus": [], "target": []}
    for batch in _batches(dataset, positions, batch_size, progress=progress, desc=desc):
        props.append(nucleus_proportion(batch["threshold"], nucleus_mask(batch["nucleus"])))
        pids.extend(batch["protein_id"])
        index.extend(batch["index"].tolist())
        view.extend(batch["view"].tolist())
        if keep:
            images["nucleus"].append(batch["nucleus"])
            images["target"].append(batch["threshold"])
    p = torch.cat(props).double().numpy() if props else np.zeros(0)
    return pids, np.asarray(index, dtype=np.int64), np.asarray(view, dtype=np.int64), p, images


def _per_protein_positions(dataset: CelleDataset, cap: int | None, seed: int) -> np.ndarray:
    """At most ``cap`` items per protein: the first ``cap`` of a seeded permutation of each protein's items."""
    n = len(dataset)
    if cap is None:
        return np.arange(n, dtype=np.int64)
    if isinstance(cap, bool) or int(cap) != cap or cap < 1:
        raise ConfigError(f"train_crops_per_protein must be a positive integer or None, got {cap!r}")
    order = np.random.default_rng([int(seed), 0x7EA1]).permutation(n)
    pids = dataset.protein_ids[order]
    # rank of each item within its protein, in permutation order
    _, inverse = np.unique(pids, return_inverse=True)
    rank = np.zeros(n, dtype=np.int64)
    seen: dict[int, int] = {}
    for j, k in enumerate(inverse.tolist()):
        rank[j] = seen.get(k, 0)
        seen[k] = rank[j] + 1
    return np.sort(order[rank < int(cap)]).astype(np.int64)


_COMPOSITION = "amino-acid (20) + dipeptide (400) composition"


def sequence_baseline(
    store: CropStore | str | os.PathLike,
    *,
    sequences: Mapping[str, str],
    train_split: str = "train",
    split: str | None = "val",
    image_size: int | None = None,
    crop_size: int = 0,
    max_crops: int | None = None,
    train_crops_per_protein: int | None = None,
    augment: bool = True,
    seed: int = 0,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    batch_size: int = 64,
    progress: bool = True,
    keep_images: bool = False,
    features: Callable[[list[str]], np.ndarray] | None = None,
    features_name: str | None = None,
) -> EvaluationResult:
    """A sequence-only baseline of the nucleus proportion, trained and evaluated in one call.

    Not in the paper: a reference point for how much of the nucleus-proportion / nuclear-localization
    accuracy of S.3.7 a model can reach from the sequence alone, without any image.

    Training
        Features: amino-acid (20) and dipeptide (400) composition of each protein's full sequence
        (:func:`sequence_features`), standardised. Target: the protein's mean nucleus proportion over
        its ``train_split`` crops (fraction of the target threshold image's pixels inside the nucleus
        mask; centre crops, no flips; at most ``train_crops_per_protein`` crops per protein). Model:
        ridge regression (scikit-learn ``RidgeCV``, the penalty chosen among ``alphas`` by efficient
        leave-one-protein-out cross-validation; a plain ``Ridge`` at the median alpha when fewer than 3
        proteins).
    Evaluation
        Each crop of ``split`` (the same crops as :func:`evaluate_celle` with the same ``seed``,
        ``augment``, ``max_crops`` and image / crop size) gets its protein's predicted proportion, clipped
        to [0, 1], scored against the crop's target proportion (with the crop's own nucleus mask):
        ``nucleus_proportion_accuracy = 1 - |p_pred - p_true|`` and ``nuclear_localization_correct``
        (both calls > 0.5, or both not). The baseline predicts no image, so the pixel, PDF and SSIM
        metrics are absent.

    Parameters
    ----------
    store
        The CELL-E crop store or its path.
    sequences
        ``protein_id`` -> amino-acid sequence for every protein of both splits.
    train_split, split
        Splits to fit on and to evaluate (``split=None``: every crop).
    image_size, crop_size
        Crop geometry, as the CELL-E run's (``run.image_size``, ``run.extra["crop_size"]``) for the same
        crops as :func:`evaluate_celle`; default: the store's crop size, whole crops.
    max_crops, augment, seed, batch_size, progress, keep_images
        As in :func:`evaluate_celle`.
    train_crops_per_protein
        Average the training target over at most this many crops per protein (a seeded choice); None: all.
    alphas
        Ridge penalties to choose from.
    features, features_name
        Other sequence features instead of the composition: a function of a list of sequences giving an
        array ``[N, F]`` (e.g. a protein encoder's localization probabilities), and its description.

    Returns
    -------
    EvaluationResult
        ``per_image`` columns: ``protein_id``, ``index``, ``view``, ``nucleus_proportion_accuracy``,
        ``nuclear_localization_correct``, ``nucleus_proportion_pred``, ``nucleus_proportion_true``.
        ``info["regressor"]`` holds the fitted scikit-learn pipeline, ``info["train_proteins"]`` their number,
        ``info["alpha"]`` the penalty.
    """
    from sklearn.linear_model import Ridge, RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    batch_size = _check_batch_size(batch_size)
    alpha_grid = [float(a) for a in alphas]
    if not alpha_grid or not all(a > 0 and math.isfinite(a) for a in alpha_grid):
        raise ConfigError(f"alphas must be positive finite numbers, got {list(alphas)!r}")
    opened = store if isinstance(store, CropStore) else CropStore.open(store)
    size = int(image_size or opened.size)
    common: dict[str, Any] = dict(sequences=sequences, image_size=size, crop_size=crop_size, seed=seed)

    # ---- fit: mean nucleus proportion of each training protein
    train_ds = CelleDataset(opened, split=train_split, augment=False, **common)
    train_pos = _per_protein_positions(train_ds, train_crops_per_protein, seed)
    pids, _, _, props, _ = _crop_proportions(
        train_ds, train_pos, batch_size, progress=progress, desc="baseline targets"
    )
    target = pd.Series(props, index=pd.Index(pids, name="protein_id")).groupby(level=0, sort=True).mean()
    train_ids = target.index.astype(str).tolist()
    featurize = features or sequence_features
    x_train = np.asarray(featurize([train_ds.sequences[p] for p in train_ids]), dtype=np.float64)
    y_train = target.to_numpy(dtype=np.float64)
    if len(train_ids) >= 3:
        regressor: Any = RidgeCV(alphas=alpha_grid)
    else:
        regressor = Ridge(alpha=float(np.median(alpha_grid)))
    model = make_pipeline(StandardScaler(), regressor)
    model.fit(x_train, y_train)
    alpha = float(getattr(model[-1], "alpha_", getattr(model[-1], "alpha", float("nan"))))

    # ---- evaluate on the crops of the split
    eval_ds = CelleDataset(opened, split=split, augment=augment, **common)
    positions = select_crops(len(eval_ds), max_crops, seed)
    pids, index, view, p_true, images = _crop_proportions(
        eval_ds, positions, batch_size, progress=progress, desc="sequence baseline", keep=keep_images
    )
    proteins = sorted(set(pids))
    x_eval = np.asarray(featurize([eval_ds.sequences[p] for p in proteins]), dtype=np.float64)
    predicted = np.clip(model.predict(x_eval), 0.0, 1.0)
    p_pred = pd.Series(predicted, index=proteins).loc[pids].to_numpy(dtype=np.float64)
    per_image = pd.DataFrame(
        {
            "protein_id": pids,
            "index": index,
            "view": view,
            "nucleus_proportion_accuracy": 1.0 - np.abs(p_pred - p_true),
            "nuclear_localization_correct": ((p_pred > 0.5) == (p_true > 0.5)).astype(np.float64),
            "nucleus_proportion_pred": p_pred,
            "nucleus_proportion_true": p_true,
        }
    )
    kept = {k: torch.cat(v) for k, v in images.items()} if keep_images else None
    info = {
        "name": "sequence baseline",
        "regressor": model,
        "alpha": alpha,
        "train_split": train_split,
        "train_proteins": len(train_ids),
        "train_crops": int(train_pos.size),
        "split": split,
        "augment": bool(augment),
        "seed": int(seed),
        "max_crops": max_crops,
        "image_size": size,
        "crop_size": eval_ds.crop_size,
        "features": features_name or (_COMPOSITION if features is None else "custom"),
    }
    return EvaluationResult.from_per_image(per_image, images=kept, info=info)


# ---------------------------------------------------------------------------------------------------- table
def _cell(value: tuple[float, float] | None, digits: int) -> str:
    if value is None:
        return "-"
    mean, sd = value
    if not math.isfinite(mean):
        return "-"
    if not math.isfinite(sd):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} +- {sd:.{digits}f}"


def format_table(
    results: Mapping[str, EvaluationResult],
    *,
    over: Literal["proteins", "images"] = "proteins",
    metrics: Sequence[str] | None = None,
    digits: int = 4,
) -> str:
    """A markdown table of several evaluations: one row per model, "mean +- sd" per metric (Table S.2).

    Parameters
    ----------
    results
        Row name (e.g. ``"VQGAN ceiling"``, ``"CELL-E"``, ``"sequence baseline"``) -> result, in row order.
    over
        ``"proteins"`` (default): :attr:`EvaluationResult.table`, every protein counts once;
        ``"images"``: :attr:`EvaluationResult.table_images`, the paper's convention.
    metrics
        Columns, in order (default: the :data:`METRICS` any result reports). A metric a result lacks
        is shown as ``-``; so is a NaN mean; a NaN sd (a single protein) leaves the mean alone.
    digits
        Decimals.

    Returns
    -------
    str
        The markdown table (header, separator, one line per row), ending with a newline.
    """
    if over not in ("proteins", "images"):
        raise ConfigError(f"over must be 'proteins' or 'images', got {over!r}")
    if not results:
        raise InputError("no results to tabulate")
    tables = {name: (r.table if over == "proteins" else r.table_images) for name, r in results.items()}
    if metrics is None:
        present = set().union(*(t.keys() for t in tables.values()))
        cols = [m for m in METRICS if m in present]
    else:
        cols = [str(m) for m in metrics]

    def esc(text: str) -> str:
        return str(text).replace("|", "\\|")

    header = ["Model", *(METRIC_LABELS.get(m, m) for m in cols)]
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for name, table in tables.items():
        cells = [esc(name), *(_cell(table.get(m), digits) for m in cols)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
