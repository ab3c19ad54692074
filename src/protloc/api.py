"""protloc's Python API: the command line as functions, results in AnnData / pandas, scanpy-like.

>>> import protloc.api as pla  # doctest: +SKIP
>>> adata = pla.embed(store="runs/demo/prepared/cytoself.zarr", split="test")  # shipped cytoself  # doctest: +SKIP
>>> scores = pla.atlas(adata)                       # adds obsm["X_umap"], returns the scores  # doctest: +SKIP
>>> fig = pla.plot_atlas(adata, ax=None)            # matplotlib Figure  # doctest: +SKIP
>>> pred = pla.predict({"GFP_NLS": "MSKGEELFT...KRPAATKKAGQAKKKK"})  # shipped CELL-E  # doctest: +SKIP
>>> pred.obs["nucleus_proportion"], pred.obsm["probability"].shape  # doctest: +SKIP

Conventions (as in scanpy): every argument after the first is keyword-only; functions that compute on an
``AnnData`` add their result to it (``obsm["X_umap"]``) and return the scores; ``plot_*`` functions take
``ax=`` and return the :class:`~matplotlib.figure.Figure`. A ``checkpoint`` of ``None`` means the shipped
default (``cytoself-small``, ``celle-tiny``, ``encoder-small``: :mod:`protloc.pretrained`);
``"pretrained:NAME"`` names one explicitly. Commands that write a results folder (``evaluate``, ``demo``)
take ``out=`` and return what they wrote.

Everything here is a re-export of :mod:`protloc.commands` (the functions the command line runs) and the
lower layers, or a thin wrapper that only converts arguments (sampling keywords into a
:class:`~protloc.eval.predict.SamplingConfig`, a checkpoint into a loaded model) before calling them.

=====================  ==============================  =============================================
command                function                        returns
=====================  ==============================  =============================================
``world make``         :func:`make_world`              the world folder
``prepare``            :func:`prepare`                 summary dict (crop counts, splits)
``import ...``         :func:`import_cytoself_crops`,  summary dict (cytoself's released crops, CELL-E
                       :func:`import_celle_manifest`   manifests -> crop stores)
``train ...``          :func:`train`                   summary dict (steps, last validation)
``embed``              :func:`embed`                   AnnData (obsm ``global``, code indices)
``atlas``              :func:`atlas`                   scores dict; adds ``obsm["X_umap"]``
``spectrum``           :func:`spectra`                 (spectra DataFrame, biclustering order)
``interpret``          :func:`feature_zeroing`         (crops, :class:`~protloc.analysis.interpret.ZeroingResult`)
``predict``            :func:`predict`                 AnnData (obs per sequence, obsm ``probability``)
``localize``           :func:`localize`                (AnnData per protein: compartment probabilities,
                                                       calls, obsm ``X_encoder``; per-residue importance)
``fill``               :func:`fill`                    DataFrame (filled sequences)
``screen``             :func:`screen`                  DataFrame (one row per variant)
``evaluate``           :func:`evaluate`                metrics dict (tables over proteins / images)
``demo``               :func:`demo`                    metrics dict of the report
=====================  ==============================  =============================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from protloc.analysis.screens import construct_experiment
from protloc.commands.atlas import atlas
from protloc.commands.embed import embed
from protloc.commands.inputs import check_batch_size, gather_sequences, load_celle, load_cytoself
from protloc.commands.interpret import feature_zeroing
from protloc.commands.spectrum import spectra
from protloc.data.imports import import_celle_manifest, import_cytoself_crops
from protloc.eval.predict import SamplingConfig, sampling_config
from protloc.plotting.atlas import plot_atlas
from protloc.plotting.celle import plot_prediction, plot_residue_probabilities
from protloc.plotting.interpret import plot_feature_zeroing
from protloc.plotting.localize import plot_importance
from protloc.plotting.screens import plot_constructs, plot_residue_attention, plot_screen
from protloc.plotting.spectrum import plot_family_correlation, plot_feature_spectrum, plot_spectrum_heatmap
from protloc.pretrained import list_pretrained

__all__ = [
    "atlas",
    "construct_experiment",
    "demo",
    "embed",
    "evaluate",
    "feature_zeroing",
    "fill",
    "import_celle_manifest",
    "import_cytoself_crops",
    "list_pretrained",
    "load_celle",
    "load_cytoself",
    "localize",
    "make_world",
    "plot_atlas",
    "plot_constructs",
    "plot_family_correlation",
    "plot_feature_spectrum",
    "plot_feature_zeroing",
    "plot_importance",
    "plot_prediction",
    "plot_residue_attention",
    "plot_residue_probabilities",
    "plot_screen",
    "plot_spectrum_heatmap",
    "predict",
    "prepare",
    "screen",
    "spectra",
    "train",
]


#: The sampling keywords of :func:`evaluate` (as ``protloc evaluate``'s flags) -> SamplingConfig fields.
_EVALUATE_SAMPLING = {
    "temperature": "temperature",
    "top_k_fraction": "top_k_fraction",
    "steps": "steps",
    "sampling_seed": "seed",
}


# ------------------------------------------------------------------------------------------ data
def make_world(
    out: str | os.PathLike,
    *,
    proteins: int | None = 100,
    fovs: int = 4,
    seed: int = 0,
    mode: str = "real",
    size: int = 512,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Render a reference cell world (``protloc world make``); see :func:`protloc.data.world.make.make_world`.

    Returns the world folder (``fovs.csv``, ``sequences.fasta``, ``truth.csv``, ``fovs/``, ``truth/``).
    """
    from protloc.data.world.make import make_world as render_world

    return Path(
        render_world(
            out,
            proteins=proteins,
            fovs=fovs,
            seed=seed,
            size=size,
            mode=mode,
            workers=workers,
            overwrite=overwrite,
            progress=progress,
        )
    )


def prepare(
    fovs: str | os.PathLike,
    *,
    out: str | os.PathLike,
    sequences: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Fields of view -> cytoself and CELL-E crop stores (``protloc prepare``).

    Runs :func:`protloc.commands.prepare.run_prepare`, as the command line does.

    Parameters
    ----------
    fovs
        Field-of-view table (CSV/TSV: ``fov_id``, ``protein_id``, ``path``, optional ``label``, ``sequence``).
    out
        Output folder.
    sequences
        FASTA of the proteins (ids = ``protein_id``).
    config, overrides
        YAML file of :class:`~protloc.data.prepare.PrepareConfig` keys and ``a.b=c`` overrides.
    workers, overwrite, progress
        As on the command line.
    """
    from protloc.commands.prepare import run_prepare

    return run_prepare(
        fovs,
        out,
        sequences=sequences,
        config=config,
        overrides=overrides,
        workers=workers,
        overwrite=overwrite,
        progress=progress,
    )


# ------------------------------------------------------------------------------------------ train
def train(
    model: str,
    *,
    store: str | os.PathLike,
    out: str | os.PathLike,
    preset: str = "tiny",
    config: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    kind: str | None = None,
    sequences: str | os.PathLike | None = None,
    nucleus_vqgan: str | os.PathLike | None = None,
    threshold_vqgan: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``"cytoself"``, ``"vqgan"`` (with ``kind="nucleus"`` / ``"threshold"``) or ``"celle"`` (``protloc train``).

    The configuration (:func:`protloc.commands.train.train_config`, as on the command line) is the
    ``preset`` (``"tiny"`` or ``"paper"``), then the YAML ``config`` (resuming without one: the run's own
    ``config.yaml``), then the ``a.b=c`` ``overrides``, then ``store`` and the other named options; the run
    folder ``out`` gets ``config.yaml``, ``metrics.jsonl``, ``best/`` and ``last/``. ``resume`` continues
    from ``out/last``. Under ``accelerate launch`` the same call trains on every process.
    """
    from protloc.commands.train import run_train, train_config

    cfg = train_config(
        model,
        out=out,
        store=store,
        preset=preset,
        config=config,
        overrides=overrides,
        kind=kind,
        sequences=sequences,
        nucleus_vqgan=nucleus_vqgan,
        threshold_vqgan=threshold_vqgan,
        resume=resume,
    )
    return run_train(cfg, out=out, resume=resume, progress=progress)


# ----------------------------------------------------------------------------------------- CELL-E
def predict(
    sequences: Mapping[str, str] | str,
    *,
    nucleus: str | os.PathLike | np.ndarray | None = None,
    checkpoint: Any = None,
    samples: int = 1,
    temperature: float = 1.0,
    top_k_fraction: float = 0.25,
    steps: int = 8,
    seed: int = 0,
    batch_size: int = 8,
    device: str = "cpu",
    precision: str = "fp32",
) -> ad.AnnData:
    """Where proteins go, from sequence + one nucleus image (CELL-E; ``protloc predict`` without files).

    The computation of ``protloc predict``: :func:`protloc.commands.predict.predict_sequences`.

    Parameters
    ----------
    sequences
        ``{name: sequence}`` or one sequence (named ``query``).
    nucleus
        Nucleus image (path or 2-D array; see :func:`protloc.commands.predict.run_predict`); ``None``: a
        real nucleus shipped with the reference world.
    checkpoint
        Run / checkpoint folder, ``pretrained:NAME``, a loaded run (:func:`load_celle`) or ``None`` (shipped).
    samples, temperature, top_k_fraction, steps, seed, batch_size, device, precision
        As ``protloc predict``.

    Returns
    -------
    anndata.AnnData
        One observation per sequence. ``obs``: ``length``, ``window_start``, ``window_end``,
        ``nucleus_proportion`` (probability-map share inside the nucleus), ``threshold_nucleus_proportion``,
        ``threshold_fraction``, ``end_token``, ``seconds``. ``obsm``: ``probability`` ``[n, S, S]`` (the 2D
        probability density map, each summing to 1) and ``threshold`` ``[n, S, S]`` (predicted binary
        image). ``uns``: ``nucleus`` (the image as the model saw it), ``nucleus_mask``, ``sampling``,
        ``checkpoint``, ``nucleus_source``.
    """
    from protloc.commands.predict import predict_sequences

    records = dict(gather_sequences(sequences))  # bad residues are named before a model is loaded
    sampling = SamplingConfig(
        temperature=temperature, top_k_fraction=top_k_fraction, seed=seed, steps=steps, samples=samples
    )
    check_batch_size(batch_size)
    run = load_celle(checkpoint, device=device, precision=precision)
    return predict_sequences(records, run=run, nucleus=nucleus, sampling=sampling, batch_size=batch_size)


def localize(
    sequences: Mapping[str, str] | str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    batch_size: int = 32,
    importance: bool = True,
    ig_steps: int = 32,
    device: str = "cpu",
    progress: bool = False,
    precision: str = "fp32",
) -> tuple[ad.AnnData, pd.DataFrame]:
    """Where proteins go from their sequence alone (protein encoder; ``protloc localize`` without files).

    The computation of ``protloc localize``: :func:`protloc.commands.localize.localize_sequences`.

    Parameters
    ----------
    sequences
        ``{name: sequence}``, one sequence (named ``query``), or a FASTA / CSV / TSV file.
    checkpoint
        Encoder run / checkpoint folder, ``pretrained:NAME`` or ``None`` (the shipped ``encoder-small``).
    batch_size, importance, ig_steps, device, progress, precision
        As ``protloc localize`` (``importance=False``: no per-residue importance; ``precision="bf16"``:
        bfloat16 autocast for the probabilities).

    Returns
    -------
    adata : anndata.AnnData
        One observation per protein: ``obs`` ``p_<compartment>``, ``p_nucleus``, ``call_<compartment>``,
        ``nuclear``, ``top_compartment``, ``d_<compartment>``, ``length``, ``clipped`` (and the importance
        peaks); ``obsm`` ``X_encoder``, ``presence``, ``distribution``; ``uns["localize"]`` (model,
        thresholds).
    importance : pandas.DataFrame
        One row per protein and residue: ``protein``, ``position``, ``residue``, ``importance_nucleus``,
        ``importance_top``, ``top_compartment`` (empty without ``importance``).
    """
    from protloc.commands.localize import DEFAULT_CHECKPOINT, localize_sequences

    return localize_sequences(
        sequences,
        checkpoint=DEFAULT_CHECKPOINT if checkpoint is None else checkpoint,
        batch_size=batch_size,
        importance=importance,
        ig_steps=ig_steps,
        device=device,
        progress=progress,
        precision=precision,
    )


def screen(
    sequence: str,
    *,
    mode: str,
    name: str = "query",
    checkpoint: Any = None,
    nucleus: str | os.PathLike | np.ndarray | None = None,
    peptides: Mapping[str, str] | None = None,
    at: Sequence[int | str] = ("end",),
    step: int | None = None,
    from_: str = "n",
    min_length: int = 1,
    window: int | None = None,
    residues: str = "A",
    positions: Sequence[int] | None = None,
    samples: int = 1,
    temperature: float = 1.0,
    top_k_fraction: float = 0.25,
    steps: int = 8,
    seed: int = 0,
    batch_size: int = 8,
    device: str = "cpu",
    precision: str = "fp32",
) -> pd.DataFrame:
    """An in-silico screen of one protein (``protloc screen``): ``mode`` ``"insert"``, ``"truncate"``,
    ``"delete"`` or ``"mutate"``.

    The variants are :func:`protloc.commands.screen.screen_variants`, predicted by
    :func:`protloc.commands.screen.screen` (as ``protloc screen``). Returns the
    :func:`~protloc.analysis.screens.predict_variants` table (wild type first; ``nucleus_proportion``,
    ``delta``, ...); draw it with :func:`plot_screen`. For residue attention use
    :func:`protloc.commands.screen.attention` or :func:`protloc.analysis.screens.residue_attention`
    with :func:`load_celle`.
    """
    import protloc.commands.screen as screen_command
    from protloc.data.sequences import validate_sequence

    variants, _ = screen_command.screen_variants(
        validate_sequence(sequence, name=name),
        mode=mode,
        name=name,
        peptides=peptides,
        at=at,
        step=step,
        from_=from_,
        min_length=min_length,
        window=window,
        residues=residues,
        positions=positions,
    )
    sampling = SamplingConfig(
        temperature=temperature, top_k_fraction=top_k_fraction, seed=seed, steps=steps, samples=samples
    )
    run = load_celle(checkpoint, device=device, precision=precision)
    return screen_command.screen(variants, run=run, nucleus=nucleus, sampling=sampling, batch_size=batch_size)


def fill(
    sequences: Mapping[str, str] | str,
    *,
    threshold: str | os.PathLike | np.ndarray,
    nucleus: str | os.PathLike | np.ndarray | None = None,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike | None = None,
    samples: int = 1,
    temperature: float = 1.0,
    top_k_fraction: float = 0.25,
    steps: int = 8,
    seed: int = 0,
    device: str = "cpu",
    precision: str = "fp32",
) -> pd.DataFrame:
    """Image to sequence (``protloc fill``): fill the ``_`` residues from a threshold and a nucleus image.

    Needs a masked-mode CELL-E trained with ``"text"`` masked (the shipped ``celle-tiny`` is
    autoregressive, so ``checkpoint`` is required). Returns one row per sequence and sample (``name``,
    ``sample``, ``filled``: the first table of :func:`protloc.commands.fill.fill_masked`); with ``out``
    the files of ``protloc fill`` (:func:`protloc.commands.fill.run_fill`) are kept there.
    """
    from protloc.commands.fill import fill_masked, run_fill

    sampling = SamplingConfig(
        temperature=temperature, top_k_fraction=top_k_fraction, seed=seed, steps=steps, samples=samples
    )
    options = dict(threshold=threshold, nucleus=nucleus, sampling=sampling)
    if out is None:
        run = load_celle(checkpoint, device=device, precision=precision)
        return fill_masked(sequences, run=run, **options)[0]
    summary = run_fill(
        checkpoint=checkpoint,
        out=out,
        sequences=sequences,
        device=device,
        precision=precision,
        overwrite=True,
        **options,
    )
    rows = [(s["name"], k + 1, text) for s in summary["sequences"] for k, text in enumerate(s["filled"])]
    return pd.DataFrame(rows, columns=["name", "sample", "filled"])


def evaluate(
    store: str | os.PathLike,
    *,
    out: str | os.PathLike,
    checkpoints: Sequence[str | os.PathLike] | None = None,
    names: Sequence[str] | None = None,
    split: str | None = "val",
    max_crops: int | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    **kwargs: Any,
) -> dict[str, Any]:
    """Image-accuracy tables of CELL-E models beside the VQGAN ceiling and a sequence-only baseline
    (``protloc evaluate``; :func:`protloc.commands.evaluate.run_evaluate`). ``checkpoints=None``: the shipped
    model. Other keywords are those of ``run_evaluate``; the sampling is given as ``temperature``,
    ``top_k_fraction``, ``steps`` and ``sampling_seed`` (as on the command line) or as ``sampling``."""
    from protloc.commands.evaluate import run_evaluate
    from protloc.pretrained import resolve_checkpoint

    given = {field: kwargs.pop(key) for key, field in _EVALUATE_SAMPLING.items() if key in kwargs}
    sampling = sampling_config(kwargs.pop("sampling", None), **given)
    ckpts = (
        [resolve_checkpoint(c) for c in checkpoints]
        if checkpoints
        else [resolve_checkpoint(None, default="celle-tiny")]
    )
    return run_evaluate(
        checkpoints=ckpts,
        store=store,
        out=out,
        names=names,
        split=split,
        max_crops=max_crops,
        sampling=sampling,
        device=device,
        precision=precision,
        overwrite=True,
        **kwargs,
    )


def demo(out: str | os.PathLike = "runs/demo", *, train: bool = False, fresh: bool = False, **settings: Any) -> dict:
    """``protloc demo``: both papers' results on the reference world (:func:`protloc.demo.run_demo`).

    ``settings`` are :class:`~protloc.demo.DemoConfig` fields (``gallery=4``, ``train_scale=0.2``, ...).
    """
    from protloc.demo import DemoConfig, run_demo

    return run_demo(out, config=DemoConfig(train=train, **settings), fresh=fresh)
