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
``tiny`` model (:mod:`protloc.pretrained`); ``"pretrained:NAME"`` names one explicitly. Commands that
write a results folder (``evaluate``, ``demo``) take ``out=`` and return what they wrote.

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
``fill``               :func:`fill`                    DataFrame (filled sequences)
``screen``             :func:`screen`                  DataFrame (one row per variant)
``evaluate``           :func:`evaluate`                metrics dict (tables over proteins / images)
``demo``               :func:`demo`                    metrics dict of the report
=====================  ==============================  =============================================
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from protloc.analysis.atlas import atlas as _atlas
from protloc.analysis.screens import construct_experiment
from protloc.data.imports import import_celle_manifest, import_cytoself_crops
from protloc.errors import ConfigError, InputError
from protloc.plotting.atlas import plot_atlas
from protloc.plotting.celle import plot_prediction, plot_residue_probabilities
from protloc.plotting.interpret import plot_feature_zeroing
from protloc.plotting.screens import plot_constructs, plot_residue_attention, plot_screen
from protloc.plotting.spectrum import plot_family_correlation, plot_feature_spectrum, plot_spectrum_heatmap
from protloc.pretrained import list_pretrained, resolve_checkpoint

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
    "make_world",
    "plot_atlas",
    "plot_constructs",
    "plot_family_correlation",
    "plot_feature_spectrum",
    "plot_feature_zeroing",
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
    from protloc.data.world.make import make_world as _make_world

    return Path(_make_world(out, proteins=proteins, fovs=fovs, seed=seed, size=size, mode=mode, workers=workers,
                            overwrite=overwrite, progress=progress))  # fmt: skip


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
    from protloc.config import load_config
    from protloc.data.prepare import PrepareConfig
    from protloc.data.prepare import prepare as _prepare

    cfg = load_config(PrepareConfig, path=config, overrides=list(overrides))
    return _prepare(fovs, out, config=cfg, sequences=sequences, workers=workers, overwrite=overwrite,
                    progress=progress)  # fmt: skip


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

    The configuration is the ``preset`` (``"tiny"`` or ``"paper"``), then the YAML ``config``, then the
    ``a.b=c`` ``overrides``; the run folder ``out`` gets ``config.yaml``, ``metrics.jsonl``, ``best/`` and
    ``last/``. ``resume`` continues from ``out/last``. Under ``accelerate launch`` the same call trains on
    every process.
    """
    from protloc.config import load_config

    extra = [f"data.store={store}"]
    if model == "cytoself":
        from protloc.train.cytoself import TrainCytoselfConfig as cls
        from protloc.train.cytoself import train_cytoself as fn
    elif model == "vqgan":
        from protloc.train.vqgan import TrainVQGANConfig as cls
        from protloc.train.vqgan import train_vqgan as fn

        if kind is not None:
            extra.append(f"kind={kind}")
    elif model == "celle":
        from protloc.train.celle import TrainCelleConfig as cls
        from protloc.train.celle import train_celle as fn

        for key, value in (("data.sequences", sequences), ("tokenizers.nucleus", nucleus_vqgan),
                           ("tokenizers.threshold", threshold_vqgan)):  # fmt: skip
            if value is not None:
                extra.append(f"{key}={value}")
    else:
        raise ConfigError(f"model must be 'cytoself', 'vqgan' or 'celle', got {model!r}")
    if preset not in ("tiny", "paper"):
        raise ConfigError(f"preset must be 'tiny' or 'paper', got {preset!r}")
    base = cls.paper() if preset == "paper" else cls.tiny()
    cfg = load_config(cls, base=base, path=config, overrides=[*extra, *overrides])
    return fn(cfg, run_dir=out, resume=resume, progress=progress)


# --------------------------------------------------------------------------------------- cytoself
def load_cytoself(checkpoint: str | os.PathLike | None = None, *, device: str = "cpu") -> Any:
    """A trained cytoself model in eval mode (``None``: the shipped ``cytoself-tiny``)."""
    from protloc.eval.load import load_cytoself as _load

    return _load(resolve_checkpoint(checkpoint, default="cytoself-tiny"), device=device)


def embed(
    store: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    split: str | None = None,
    batch_size: int = 256,
    include_local: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> ad.AnnData:
    """cytoself encodings of a crop store's crops (``protloc embed``), as an in-memory AnnData.

    ``obs``: ``protein_id``, ``fov_id``, ``split``, ``label``, ...; ``obsm``: ``global`` (the atlas
    input), ``global_indices`` and ``local_indices`` (for feature spectra), optionally ``local``. With
    ``out`` the ``.h5ad`` is kept there; otherwise it is written to a temporary file and read back.
    """
    from protloc.eval.embed import embed as _embed

    ckpt = resolve_checkpoint(checkpoint, default="cytoself-tiny")
    if out is not None:
        path = _embed(ckpt, store, out, split=split, batch_size=batch_size, include_local=include_local,
                      device=device, overwrite=True, progress=progress)  # fmt: skip
        return ad.read_h5ad(path)
    with tempfile.TemporaryDirectory(prefix="protloc-embed-") as tmp:
        path = _embed(ckpt, store, Path(tmp) / "embeddings.h5ad", split=split, batch_size=batch_size,
                      include_local=include_local, device=device, progress=progress)  # fmt: skip
        adata = ad.read_h5ad(path)
        adata = adata.to_memory() if adata.isbacked else adata
    return adata


def atlas(
    adata: ad.AnnData,
    *,
    label_key: str = "label",
    split: str | None = None,
    complexes: Mapping[str, str] | None = None,
    random_state: int | None = 0,
    **kwargs: Any,
) -> dict[str, Any]:
    """UMAP atlas + clustering score + k-NN macro-F1 (cytoself Fig. 2); adds ``obsm["X_umap"]`` to ``adata``.

    ``split=None`` maps every crop of ``adata`` (give ``"test"`` to map only the test crops, as the
    paper). Other keyword arguments go to :func:`protloc.analysis.atlas.atlas`.
    """
    return _atlas(adata, label_key=label_key, split=split, complexes=complexes, random_state=random_state, **kwargs)


def spectra(
    adata: ad.AnnData, *, level: str = "local", n_clusters: int = 11, group_key: str = "protein_id"
) -> tuple[pd.DataFrame, Any]:
    """Feature spectra (proteins x codes) and their biclustering (cytoself Fig. 4).

    Returns ``(spectra, order)``: per-protein code frequencies and a
    :class:`~protloc.analysis.spectrum.SpectrumOrder` (``order.apply(spectra)`` reorders, and the feature
    clusters are in ``order.feature_clusters``); draw them with :func:`plot_spectrum_heatmap`.
    """
    from protloc.analysis.spectrum import bicluster, spectra_from_indices

    key = {"local": "local_indices", "global": "global_indices"}.get(level)
    if key is None:
        raise ConfigError(f"level must be 'local' or 'global', got {level!r}")
    if key not in adata.obsm:
        raise InputError(f"adata has no obsm[{key!r}] (use protloc embed / protloc.api.embed)")
    info = adata.uns.get("cytoself", {})
    k = int(info.get("codebook_size1" if level == "local" else "codebook_size2", 0)) or None
    spec = spectra_from_indices(np.asarray(adata.obsm[key]), adata.obs[group_key].astype(str).to_numpy(),
                                codebook_size=k)  # fmt: skip
    return spec, bicluster(spec, n_clusters=n_clusters)


def feature_zeroing(
    store: str | os.PathLike,
    *,
    protein: str,
    checkpoint: str | os.PathLike | None = None,
    top: int = 3,
    n_crops: int = 4,
    split: str | None = None,
    level: str = "local",
    device: str = "cpu",
) -> tuple[np.ndarray, Any]:
    """Feature zeroing of one protein's strongest codes (cytoself Fig. 5).

    Returns ``(images, result)``: the ``n_crops`` crops using the top code most (``[B, S, S]``, the
    protein channel) and their :class:`~protloc.analysis.interpret.ZeroingResult`; draw them with
    ``plot_feature_zeroing(images, result)``.
    """
    import torch

    from protloc.analysis.interpret import feature_zeroing as _fz
    from protloc.analysis.interpret import top_codes
    from protloc.data.io import CropStore

    model = load_cytoself(checkpoint, device=device)
    crops = CropStore.open(store)
    obs = crops.obs
    mask = obs["protein_id"].astype(str).to_numpy() == protein
    if split is not None:
        mask &= obs["split"].astype(str).to_numpy() == split
    rows = np.flatnonzero(mask)
    if len(rows) == 0:
        raise InputError(f"no crops of protein {protein!r}" + (f" in split {split!r}" if split else ""),
                         path=crops.path)  # fmt: skip
    data = crops.read(rows, channels=list(model.config.channels))
    x = torch.from_numpy(np.stack([np.asarray(data[c], np.float32) for c in model.config.channels], 1)).to(device)
    with torch.inference_mode():
        idx = np.concatenate([
            (e.idx1 if level == "local" else e.idx2).cpu().numpy()
            for e in (model.encode(x[s : s + 256]) for s in range(0, len(x), 256))
        ])  # fmt: skip
    codes = top_codes(idx, k=top)
    usage = (idx.reshape(len(x), -1) == codes[0]).mean(axis=1) if codes else np.zeros(len(x))
    pick = np.sort(np.argsort(-usage, kind="stable")[:n_crops])
    return x[pick, 0].cpu().numpy(), _fz(model, x[pick], codes, level=level)


# ----------------------------------------------------------------------------------------- CELL-E
def load_celle(
    checkpoint: str | os.PathLike | None = None,
    *,
    device: str = "cpu",
    precision: str = "fp32",
    embedder_path: str | os.PathLike | None = None,
) -> Any:
    """A trained CELL-E with its tokenizers (``None``: the shipped ``celle-tiny``); see
    :func:`protloc.eval.load.load_celle_run`. ``embedder_path`` replaces the ESM-2 / TAPE weights path
    recorded at training time."""
    from protloc.eval.load import load_celle_run
    from protloc.models.embedders import EmbedderConfig

    embedder = EmbedderConfig(path=str(embedder_path)) if embedder_path else None
    return load_celle_run(resolve_checkpoint(checkpoint, default="celle-tiny"), map_location=device,
                          precision=precision, embedder=embedder)  # fmt: skip


def _run_and_nucleus(checkpoint: Any, nucleus: Any, device: str, precision: str) -> tuple[Any, np.ndarray, dict]:
    from protloc.workflows import _model_nucleus

    run = checkpoint if hasattr(checkpoint, "model") and hasattr(checkpoint, "threshold") else None
    if run is None:
        run = load_celle(checkpoint, device=device, precision=precision)
    nuc, info = _model_nucleus(run, nucleus)
    return run, nuc, info


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

    Parameters
    ----------
    sequences
        ``{name: sequence}`` or one sequence (named ``query``).
    nucleus
        Nucleus image (path or 2-D array; see :func:`protloc.workflows.run_predict`); ``None``: a real
        nucleus shipped with the reference world.
    checkpoint
        Run / checkpoint folder, ``pretrained:NAME``, a loaded run (:func:`load_celle`) or ``None`` (shipped).
    samples, temperature, top_k_fraction, steps, seed, batch_size, device, precision
        As ``protloc predict``.

    Returns
    -------
    anndata.AnnData
        One observation per sequence. ``obs``: ``length``, ``window_start``, ``window_end``,
        ``nucleus_proportion`` (probability-map share inside the nucleus), ``threshold_nucleus_proportion``,
        ``threshold_fraction``. ``obsm``: ``probability`` ``[n, S, S]`` (the 2D probability density map,
        each summing to 1) and ``threshold`` ``[n, S, S]`` (predicted binary image). ``uns``: ``nucleus``
        (the image as the model saw it), ``nucleus_mask``, ``sampling``, ``checkpoint``.
    """
    import torch

    from protloc.eval.metrics import nucleus_proportion
    from protloc.eval.predict import SamplingConfig
    from protloc.eval.predict import predict as _predict
    from protloc.workflows import _check_batch_size, _gather_sequences

    records = _gather_sequences(sequences, None)
    sampling = SamplingConfig(temperature=temperature, top_k_fraction=top_k_fraction, seed=seed, steps=steps,
                              samples=samples)  # fmt: skip
    _check_batch_size(batch_size)
    run, nuc, info = _run_and_nucleus(checkpoint, nucleus, device, precision)
    size, window = run.image_size, run.model.config.max_residues
    nuc_t = torch.from_numpy(nuc)[None, None]
    probs, thrs, rows, mask_np = [], [], [], None
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        res = _predict(run, [s for _, s in batch], nuc_t.expand(len(batch), 1, size, size), sampling=sampling)
        prob = res["probability"].float().cpu()
        thr = res["threshold"].float().cpu()
        mask = res["nucleus_mask"].cpu()
        mask_np = mask[0, 0].numpy() if mask_np is None else mask_np
        thr_prop = nucleus_proportion(thr, mask).tolist()
        for i, (name, seq) in enumerate(batch):
            s0 = int(res["window_start"][i])
            rows.append({"name": name, "length": len(seq), "window_start": s0,
                         "window_end": min(len(seq), s0 + window),
                         "nucleus_proportion": float(res["nucleus_proportion"][i]),
                         "threshold_nucleus_proportion": float(thr_prop[i]),
                         "threshold_fraction": float((thr[i, 0] > 0.5).float().mean())})  # fmt: skip
        probs.append(prob[:, 0].numpy())
        thrs.append((thr[:, 0] > 0.5).numpy().astype(np.uint8))
    obs = pd.DataFrame(rows).set_index("name")
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(obs=obs)
    adata.obs_names_make_unique()
    adata.obsm["probability"] = np.concatenate(probs).astype(np.float32)
    adata.obsm["threshold"] = np.concatenate(thrs)
    adata.uns["nucleus"] = nuc.astype(np.float32)
    adata.uns["nucleus_mask"] = np.asarray(mask_np, dtype=np.uint8)
    adata.uns["sampling"] = {"samples": samples, "temperature": temperature, "top_k_fraction": top_k_fraction,
                             "steps": steps, "seed": seed}  # fmt: skip
    adata.uns["checkpoint"] = str(run.checkpoint)
    adata.uns["nucleus_source"] = {k: str(v) for k, v in info.items()}
    return adata


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

    Returns the :func:`~protloc.analysis.screens.run_screen` table (wild type first; ``nucleus_proportion``,
    ``delta``, ...); draw it with :func:`plot_screen`. For residue attention use
    :func:`protloc.analysis.screens.residue_attention` with :func:`load_celle`.
    """
    import torch

    from protloc.analysis.screens import run_screen
    from protloc.data.sequences import validate_sequence
    from protloc.eval.predict import SamplingConfig
    from protloc.workflows import _screen_variants

    if mode == "attention":
        raise ConfigError("screen() runs variant screens; for attention use protloc.analysis.screens.residue_attention")
    seq = validate_sequence(sequence, name=name)
    opts = {"peptides": peptides, "at": list(at), "step": step, "from_": from_, "min_length": min_length,
            "window": window, "residues": residues, "positions": positions}  # fmt: skip
    variants, _ = _screen_variants(mode, seq, name, opts)
    sampling = SamplingConfig(temperature=temperature, top_k_fraction=top_k_fraction, seed=seed, steps=steps,
                              samples=samples)  # fmt: skip
    run, nuc, _ = _run_and_nucleus(checkpoint, nucleus, device, precision)
    return run_screen(run, variants, torch.from_numpy(nuc)[None, None], sampling=sampling, batch_size=batch_size)


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
    ``sample``, ``filled``); with ``out`` the files of ``protloc fill`` are kept there.
    """
    from protloc.workflows import run_fill

    def _go(dest: Path) -> pd.DataFrame:
        run_fill(checkpoint=resolve_checkpoint(checkpoint), out=dest, threshold=threshold, sequences=sequences,
                 nucleus=nucleus, samples=samples, temperature=temperature, top_k_fraction=top_k_fraction,
                 steps=steps, seed=seed, device=device, precision=precision, overwrite=True,
                 progress=False)  # fmt: skip
        from protloc.data.sequences import read_fasta

        recs = read_fasta(dest / "filled.fasta")
        rows = []
        for rid, seq in recs.items():
            stem, _, k = rid.rpartition("_sample")
            rows.append({"name": stem, "sample": int(k) if k.isdigit() else 0, "filled": seq})
        return pd.DataFrame(rows, columns=["name", "sample", "filled"])

    if out is not None:
        return _go(Path(out))
    with tempfile.TemporaryDirectory(prefix="protloc-fill-") as tmp:
        return _go(Path(tmp) / "fill")


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
    (``protloc evaluate``; :func:`protloc.workflows.run_evaluate`). ``checkpoints=None``: the shipped model."""
    from protloc.workflows import run_evaluate

    if checkpoints:
        ckpts = [resolve_checkpoint(c) for c in checkpoints]
    else:
        ckpts = [resolve_checkpoint(None, default="celle-tiny")]
    return run_evaluate(checkpoints=ckpts, store=store, out=out, names=names, split=split, max_crops=max_crops,
                        device=device, precision=precision, overwrite=True, **kwargs)  # fmt: skip


def demo(out: str | os.PathLike = "runs/demo", *, train: bool = False, fresh: bool = False, **settings: Any) -> dict:
    """``protloc demo``: both papers' results on the reference world (:func:`protloc.demo.run_demo`).

    ``settings`` are :class:`~protloc.demo.DemoConfig` fields (``gallery=4``, ``train_scale=0.2``, ...).
    """
    from protloc.demo import DemoConfig, run_demo

    return run_demo(out, config=DemoConfig(train=train, **settings), fresh=fresh)
