"""File-level workflows behind the commands: read inputs, compute, plot, write a results folder.

This is the top of the import order below ``cli`` (``... -> analysis -> plotting -> workflows ->
cli``): each function here is what one command does, callable from Python with keyword arguments.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from protloc._fs import atomic_dir, atomic_path, atomic_write_json, atomic_write_text
from protloc.analysis.atlas import atlas as compute_atlas
from protloc.analysis.interpret import feature_zeroing, top_codes
from protloc.analysis.spectrum import bicluster, consensus_spectra, family_correlation, spectra_from_indices
from protloc.data.io import CropStore, check_image, read_image, read_table, save_npy, write_png
from protloc.data.sequences import read_fasta, validate_sequence
from protloc.errors import ConfigError, InputError
from protloc.eval.embed import read_obsm
from protloc.eval.load import load_cytoself
from protloc.plotting.atlas import atlas_html, plot_atlas
from protloc.plotting.celle import plot_prediction, plot_residue_probabilities
from protloc.plotting.crops import composite
from protloc.plotting.interpret import plot_feature_zeroing
from protloc.plotting.spectrum import plot_family_correlation, plot_feature_spectrum, plot_spectrum_heatmap

logger = logging.getLogger(__name__)

__all__ = ["run_atlas", "run_evaluate", "run_interpret", "run_predict", "run_screen_workflow", "run_spectrum"]


def _save_fig(fig, path: Path, *, dpi: int = 120) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    return path


def _safe_name(name: str) -> str:
    """A file-name-safe version of a protein id."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _write_json(path: Path, obj: Any) -> Path:
    return atomic_write_json(path, obj)


def _writes_folder(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Make a workflow that writes into its ``out`` folder atomic and refuse a non-empty ``out``.

    The wrapped function writes into a temporary folder beside ``out`` that replaces ``out`` only when the
    function returns, so bad input found halfway (an unknown query protein, say) leaves nothing behind and
    an earlier result intact. The wrapper adds the keyword ``overwrite`` (replace a non-empty ``out``).
    """
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, overwrite: bool = False, **kwargs: Any) -> Any:
        bound = sig.bind(*args, **kwargs)
        out = Path(bound.arguments["out"])
        _check_predict_out(out, overwrite)
        with atomic_dir(out) as tmp:
            bound.arguments["out"] = tmp
            return fn(*bound.args, **bound.kwargs)

    return wrapper


def _load_split(embeddings: str | os.PathLike, split: str | None, keys: Sequence[str]) -> ad.AnnData:
    """An in-memory AnnData with only the rows of ``split`` and only the ``obsm`` keys asked for."""
    path = Path(embeddings)
    if not path.is_file():
        raise InputError("embeddings file not found", path=path)
    try:
        backed = ad.read_h5ad(path, backed="r")
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise InputError(f"cannot read the embeddings: not an .h5ad file, or a damaged one ({exc})", path=path) from exc
    obs = backed.obs.copy()
    uns = dict(backed.uns)
    backed.file.close()
    if split is not None:
        if "split" not in obs:
            raise InputError("no 'split' column in obs", path=path)
        rows = np.flatnonzero(obs["split"].astype(str).to_numpy() == split)
        if len(rows) == 0:
            have = sorted(obs["split"].astype(str).unique())
            raise InputError(f"no crops in split {split!r} (splits here: {have})", path=path)
    else:
        rows = np.arange(len(obs))
    sub = ad.AnnData(obs=obs.iloc[rows].copy(), uns=uns)
    for key in keys:
        sub.obsm[key] = read_obsm(path, key, rows=rows)
    return sub


@_writes_folder
def run_atlas(
    embeddings: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: str | None = "test",
    label_key: str = "label",
    complexes: str | os.PathLike | Mapping[str, str] | None = None,
    store: str | os.PathLike | None = None,
    max_thumbnails: int = 600,
    thumbnail_size: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """UMAP localization atlas, clustering scores and k-NN macro-F1 of one split (paper Fig. 2, 6).

    Writes ``atlas.png``, ``atlas.html`` (self-contained, hover shows protein, label and crop when
    ``store`` is given), ``umap.csv`` and ``scores.json`` into ``out``.

    Parameters
    ----------
    embeddings
        ``.h5ad`` from ``protloc embed``.
    out
        Output folder.
    split
        Split to map (the paper maps the test set); ``None`` = all crops.
    label_key
        ``obs`` column of localization labels.
    complexes
        Protein -> complex table (CSV/TSV with ``protein_id`` and ``complex``) or mapping, for the
        complex-level clustering score.
    store
        The crop store the embeddings came from, for hover thumbnails.
    max_thumbnails
        At most this many crops get a thumbnail (spread evenly over the points); each adds a few kB
        to the HTML file.
    thumbnail_size
        Thumbnail side in pixels.
    seed
        UMAP random state.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    adata = _load_split(embeddings, split, ["global"])
    cmap = _read_complexes(complexes)
    # UMAP has no progress to report; say what is running (about a minute for 6,000 crops on 2 cores)
    logger.info("UMAP and k-NN scores of %d crops ...", adata.n_obs)
    result = compute_atlas(adata, label_key=label_key, complexes=cmap, split=None, random_state=seed)
    coords = adata.obsm["X_umap"]
    fig = plot_atlas(adata, color=label_key, title=f"cytoself atlas ({split or 'all'} crops)")
    _save_fig(fig, out / "atlas.png", dpi=130)
    thumbs = _thumbnails(store, adata.obs, max_thumbnails) if store is not None else None
    atlas_html(coords, adata.obs, path=out / "atlas.html", color=label_key, thumbnails=thumbs,
               thumbnail_size=thumbnail_size, title=f"protloc cytoself atlas ({split or 'all'} crops)")
    table = adata.obs[[c for c in ("crop_index", "protein_id", "fov_id", "split", label_key) if c in adata.obs]].copy()
    table["umap1"], table["umap2"] = coords[:, 0], coords[:, 1]
    with atomic_path(out / "umap.csv") as tmp:
        table.to_csv(tmp, index=False)
    _write_json(out / "scores.json", result)
    return result


def _read_complexes(complexes: str | os.PathLike | Mapping[str, str] | None) -> dict[str, str] | None:
    if complexes is None:
        return None
    if isinstance(complexes, Mapping):
        return {str(k): str(v) for k, v in complexes.items()}
    t = read_table(complexes, required=("protein_id", "complex"), unique=("protein_id",))
    return dict(zip(t["protein_id"].astype(str), t["complex"].astype(str), strict=True))


def _thumbnails(store: str | os.PathLike, obs: pd.DataFrame, max_n: int) -> list[np.ndarray | None]:
    crops = CropStore.open(store)
    n = len(obs)
    chosen = np.unique(np.linspace(0, n - 1, num=min(n, max_n)).round().astype(int)) if n else np.zeros(0, int)
    idx = obs["crop_index"].to_numpy().astype(np.int64)[chosen]
    order = np.argsort(idx)
    channels = [c for c in ("nucleus", "protein") if c in crops.channels]
    data = crops.read(idx[order], channels=channels)
    thumbs: list[np.ndarray | None] = [None] * n
    for j, pos in enumerate(chosen[order]):
        prot = np.asarray(data["protein"][j], dtype=np.float32)
        nuc = np.asarray(data["nucleus"][j], dtype=np.float32) if "nucleus" in data else np.zeros_like(prot)
        thumbs[pos] = composite(nuc, prot)
    return thumbs


@_writes_folder
def run_spectrum(
    embeddings: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: str | None = None,
    label_key: str = "label",
    queries: Sequence[str] = (),
    n_clusters: int = 11,
    level: str = "local",
) -> dict[str, Any]:
    """Feature spectra, biclustering and localization-family correlations (paper Fig. 4).

    Writes ``spectra.csv`` (proteins x codes, frequencies, biclustered order), ``feature_clusters.csv``
    (code -> cluster i..xi), ``spectrum_heatmap.png`` and, per query protein,
    ``spectrum_<protein>.png`` + ``families_<protein>.csv`` / ``.png``.

    Parameters
    ----------
    embeddings
        ``.h5ad`` from ``protloc embed``.
    out
        Output folder.
    split
        Crops of this split only (``None`` = all crops, as the paper's spectra use every image).
    label_key
        ``obs`` column of localization labels (families).
    queries
        Proteins whose spectrum and family correlations to draw (paper Fig. 4e: an unknown protein).
    n_clusters
        Top-level feature clusters (the paper's 11).
    level
        ``local`` (VQ1 indices, as the paper) or ``global`` (VQ2 indices).
    """
    key = {"local": "local_indices", "global": "global_indices"}.get(level)
    if key is None:
        raise InputError(f"level must be local or global, got {level!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    adata = _load_split(embeddings, split, [key])
    info = adata.uns.get("cytoself", {})
    k = int(info.get("codebook_size1" if level == "local" else "codebook_size2", 0)) or None
    spectra = spectra_from_indices(adata.obsm[key], adata.obs["protein_id"].astype(str).to_numpy(), codebook_size=k)
    order = bicluster(spectra, n_clusters=n_clusters)
    ordered = order.apply(spectra)
    with atomic_path(out / "spectra.csv") as tmp:
        ordered.to_csv(tmp)
    clusters = pd.DataFrame({"code": np.arange(len(order.feature_clusters)), "cluster": order.feature_clusters})
    clusters["cluster_name"] = clusters["cluster"].map(order.cluster_names)
    clusters["position"] = np.argsort(order.feature_order)
    with atomic_path(out / "feature_clusters.csv") as tmp:
        clusters.sort_values("position").to_csv(tmp, index=False)
    _save_fig(plot_spectrum_heatmap(spectra, order), out / "spectrum_heatmap.png")
    labels = (
        adata.obs.drop_duplicates("protein_id").set_index("protein_id")[label_key].astype(str)
        if label_key in adata.obs
        else pd.Series(dtype=str)
    )
    consensus = consensus_spectra(spectra, labels) if len(labels) else None
    summary: dict[str, Any] = {
        "proteins": int(spectra.shape[0]),
        "codes": int(spectra.shape[1]),
        "used_codes": int(len(order.used_features)),
        "clusters": int(order.n_clusters),
        "queries": {},
    }
    for q in queries:
        if q not in spectra.index:
            raise InputError(f"protein {q!r} has no crops in these embeddings", path=embeddings)
        safe = _safe_name(q)
        _save_fig(plot_feature_spectrum(spectra, q, order), out / f"spectrum_{safe}.png")
        if consensus is not None and len(consensus):
            corr = family_correlation(q, consensus, spectra=spectra, labels=labels)
            with atomic_path(out / f"families_{safe}.csv") as tmp:
                corr.rename("pearson_r").to_csv(tmp)
            _save_fig(plot_family_correlation(corr, highlight=labels.get(q)), out / f"families_{safe}.png")
            summary["queries"][q] = {"label": labels.get(q, ""), "best_family": str(corr.index[0]),
                                     "r": float(corr.iloc[0])}
    _write_json(out / "spectrum.json", summary)
    return summary


@_writes_folder
def run_interpret(
    checkpoint: str | os.PathLike,
    store: str | os.PathLike,
    out: str | os.PathLike,
    *,
    protein: str,
    top: int = 3,
    n_crops: int = 4,
    split: str | None = None,
    level: str = "local",
    device: str = "cpu",
) -> dict[str, Any]:
    """Feature zeroing for one protein's strongest codes (paper Fig. 5).

    The ``top`` most frequent codes over the protein's crops are zeroed one at a time before
    decoding; ``feature_zeroing_<protein>.png`` shows, for ``n_crops`` crops, the input, the
    reconstruction and each code's difference map in red.
    """
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_cytoself(checkpoint, device=device)
    crops = CropStore.open(store)
    obs = crops.obs
    mask = obs["protein_id"].astype(str).to_numpy() == protein
    if split is not None:
        mask &= obs["split"].astype(str).to_numpy() == split
    rows = np.flatnonzero(mask)
    if len(rows) == 0:
        raise InputError(f"no crops of protein {protein!r}" + (f" in split {split!r}" if split else ""),
                         path=crops.path)
    data = crops.read(rows, channels=list(model.config.channels))
    x = torch.from_numpy(np.stack([np.asarray(data[c], np.float32) for c in model.config.channels], 1)).to(device)
    with torch.inference_mode():
        idx = []
        for s in range(0, len(x), 256):
            enc = model.encode(x[s : s + 256])
            idx.append((enc.idx1 if level == "local" else enc.idx2).cpu().numpy())
    codes = top_codes(np.concatenate(idx), k=top)
    # show the crops that use the top code most
    usage = (np.concatenate(idx).reshape(len(x), -1) == codes[0]).mean(axis=1) if codes else np.zeros(len(x))
    pick = np.sort(np.argsort(-usage, kind="stable")[:n_crops])
    result = feature_zeroing(model, x[pick], codes, level=level)
    fig = plot_feature_zeroing(x[pick, 0].cpu().numpy(), result, title=f"{protein}: {level} codes {codes}")
    safe = _safe_name(protein)
    _save_fig(fig, out / f"feature_zeroing_{safe}.png")
    summary = {
        "protein": protein,
        "level": level,
        "codes": codes,
        "crops": [int(v) for v in obs["crop_index"].to_numpy()[rows[pick]]],
        "mean_abs_difference": [float(np.abs(d).mean()) for d in result.difference],
        "usage": [float(u.mean()) for u in result.usage],
    }
    _write_json(out / f"feature_zeroing_{safe}.json", summary)
    return summary


# ------------------------------------------------------------------------------------------- predict
#: Reference-world geometry of the default nucleus (protloc.data.world.render.RenderParams defaults):
#: a 12 um nucleus at 0.4 um per pixel is 30 px across in a field of view and in its CELL-E crops.
_DEFAULT_NUCLEUS_DIAMETER_UM = 12.0
_DEFAULT_PIXEL_SIZE_UM = 0.4


def _square_to_model(
    image: np.ndarray,
    size: int,
    *,
    source: str,
    name: str,
    scale: Callable[[np.ndarray], np.ndarray],
    check: Callable[[np.ndarray], None] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """A 2-D image -> ``[size, size]`` float32: its largest centred square, ``scale``-d (to [0, 1]), then
    area-averaged to ``size`` (as the CELL-E data pipeline resizes its crops). ``check`` sees the whole
    2-D image first."""
    import torch

    arr = check_image(image, path=source, name=f"{name} image")  # numeric, non-empty, finite
    if arr.ndim > 2:
        arr = np.squeeze(arr)  # a [1, Y, X] or [Y, X, 1] grey image
    if arr.ndim != 2:
        raise InputError(
            f"the {name} image must be a 2-D grey image, got shape {tuple(np.shape(image))}", path=source
        )
    arr = arr.astype(np.float64)
    if check is not None:
        check(arr)
    h, w = arr.shape
    if min(h, w) < size:
        raise InputError(
            f"the {name} image is {h} x {w} px; the model needs at least {size} x {size} (its image size)",
            path=source,
        )
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    crop = scale(arr[y0 : y0 + side, x0 : x0 + side])
    t = torch.from_numpy(crop.astype(np.float32))[None, None]
    if side != size:
        t = torch.nn.functional.interpolate(t, size=(size, size), mode="area")
    out = t[0, 0].clamp(0.0, 1.0).numpy().astype(np.float32)
    return out, {"input_shape": [int(h), int(w)], "crop": {"y": int(y0), "x": int(x0), "side": int(side)}}


def _nucleus_to_model(image: np.ndarray, size: int, *, source: str) -> tuple[np.ndarray, dict[str, Any]]:
    """A 2-D grey image -> the ``[size, size]`` float32 nucleus crop in [0, 1] a CELL-E model sees.

    Largest centred square, min-max scaled to [0, 1] (as ``protloc prepare`` scales each crop), then
    area-averaged to ``size`` (as the CELL-E data pipeline resizes its crops): the result lies in
    [0, 1] without necessarily reaching both ends.
    """

    def minmax(crop: np.ndarray) -> np.ndarray:
        lo, hi = float(crop.min()), float(crop.max())
        if not hi > lo:
            raise InputError(
                f"the nucleus image is constant ({lo:g}) in its centred square: nothing to scale", path=source
            )
        return (crop - lo) / (hi - lo)

    return _square_to_model(image, size, source=source, name="nucleus", scale=minmax)


def _reference_nucleus(size: int, field_px: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The default nucleus: a real DNA-stain nucleus of the reference world's assets, as a CELL-E crop.

    The first patch of ``nuclei.npz`` whose mask was not completed over a neighbour (nucleus 1 of the
    mahotas ``nuclear.png`` demo image), background-subtracted and zeroed outside its mask, is centred
    (mask centroid) in an empty field of ``field_px`` crop pixels at the reference world's scale: a
    12 um nucleus at 0.4 um per pixel (30 px across at the paper's 256 px crops). The field is then
    made into the model's input like any nucleus image (:func:`_nucleus_to_model`). Nothing is
    downloaded: the patch ships with protloc.
    """
    from protloc.data.world.assets import load_nuclei, load_nuclei_sources

    patches, sources = load_nuclei(), load_nuclei_sources()
    index = next((i for i, s in enumerate(sources) if "neighbour_filled" not in s), 0)
    image, mask = patches[index]
    img = image.astype(np.float64)
    background = float(np.median(img[~mask])) if (~mask).any() else 0.0
    img = np.where(mask, np.clip(img - background, 0.0, None), 0.0)
    diameter = 2.0 * np.sqrt(mask.sum() / np.pi)  # equivalent diameter, patch pixels
    target = _DEFAULT_NUCLEUS_DIAMETER_UM / _DEFAULT_PIXEL_SIZE_UM  # crop pixels
    # Work at the patch's resolution: the field spans field_px crop pixels = field_px * diameter / target
    # patch pixels; _nucleus_to_model area-averages it down to the model's size.
    canvas = max(int(round(field_px * diameter / target)), size)
    field = np.zeros((canvas, canvas), dtype=np.float64)
    ys, xs = np.nonzero(mask)
    oy, ox = canvas // 2 - int(round(ys.mean())), canvas // 2 - int(round(xs.mean()))
    h, w = img.shape
    ty0, tx0 = max(0, oy), max(0, ox)
    ty1, tx1 = min(canvas, oy + h), min(canvas, ox + w)
    field[ty0:ty1, tx0:tx1] = img[ty0 - oy : ty1 - oy, tx0 - ox : tx1 - ox]
    out, _ = _nucleus_to_model(field, size, source="reference nucleus")
    info = {
        "source": f"reference world nucleus {index} ({sources[index]})",
        "field_px": int(field_px),
        "nucleus_diameter_um": _DEFAULT_NUCLEUS_DIAMETER_UM,
        "pixel_size_um": _DEFAULT_PIXEL_SIZE_UM,
    }
    return out, info


def _unique_stems(names: Sequence[str]) -> list[str]:
    """File-name-safe, unique (also ignoring case) stems for output names."""
    stems: list[str] = []
    taken: set[str] = set()
    for name in names:
        base = _safe_name(name).lstrip(".")[:100] or "sequence"
        stem, k = base, 1
        while stem.lower() in taken:
            k += 1
            stem = f"{base}_{k}"
        taken.add(stem.lower())
        stems.append(stem)
    return stems


def _check_predict_out(out: Path, overwrite: bool) -> None:
    if not out.exists() or overwrite:
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    raise InputError("output already exists and is not empty (pass --overwrite to replace it)", path=out)


def _gather_sequences(
    sequences: Mapping[str, str] | str | None,
    fasta: str | os.PathLike | None,
    *,
    check: Callable[[str, str], Any] | None = None,
) -> list[tuple[str, str]]:
    """``(name, sequence)`` records from a mapping / string or a FASTA file, validated as amino-acid
    sequences, or by ``check(sequence, name)`` instead (which raises on bad input)."""
    if (sequences is None) == (fasta is None):
        raise InputError("give either sequences or a FASTA file (exactly one)")
    if fasta is not None:
        path = Path(fasta)
        if not path.is_file():
            raise InputError("FASTA file not found", path=path)
        records = list(read_fasta(path, validate=check is None).items())
        if not records:
            raise InputError("the FASTA file holds no sequences", path=path)
    else:
        if isinstance(sequences, str):
            sequences = {"query": sequences}
        records = [
            (str(name), seq if check is not None else validate_sequence(seq, name=str(name)))
            for name, seq in sequences.items()
        ]
        if not records:
            raise InputError("no sequences to predict")
    if check is not None:
        for name, seq in records:
            check(seq, name)
    return records


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def _load_celle(
    checkpoint: str | os.PathLike, device: str | None, precision: str = "fp32",
    embedder_path: str | os.PathLike | None = None,
) -> tuple[Any, str]:
    """Load a CELL-E run or checkpoint folder on ``device`` (``None``: CUDA when available) in ``precision``;
    ``embedder_path`` replaces the ESM-2 / TAPE weights path recorded at training time (moved weights)."""
    import torch

    from protloc.eval.load import load_celle_run
    from protloc.models.embedders import EmbedderConfig

    ckpt = Path(checkpoint)
    if not ckpt.exists():
        raise InputError("checkpoint not found (give a `protloc train celle` run or checkpoint folder)", path=ckpt)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    embedder = EmbedderConfig(path=str(embedder_path)) if embedder_path else None
    return load_celle_run(ckpt, map_location=device, precision=precision, embedder=embedder), device


def _model_nucleus(run: Any, nucleus: str | os.PathLike | np.ndarray | None) -> tuple[np.ndarray, dict[str, Any]]:
    """The ``[S, S]`` nucleus input of ``run``: from an image file / array, else the reference nucleus
    (see :func:`run_predict`), with a description of its source."""
    size = run.image_size
    if nucleus is None:
        field = int(run.extra.get("crop_size") or 0) or _default_celle_crop()
        return _reference_nucleus(size, field)
    if isinstance(nucleus, np.ndarray):
        source, raw = "nucleus array", nucleus
    else:
        source = str(nucleus)
        raw = read_image(nucleus)
    nuc, info = _nucleus_to_model(raw, size, source=source)
    return nuc, {"source": source, **info}


def run_predict(
    *,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    sequences: Mapping[str, str] | str | None = None,
    fasta: str | os.PathLike | None = None,
    nucleus: str | os.PathLike | np.ndarray | None = None,
    samples: int = 1,
    temperature: float = 1.0,
    top_k_fraction: float = 0.25,
    steps: int = 8,
    seed: int = 0,
    batch_size: int = 8,
    device: str | None = "cpu",
    precision: str = "fp32",
    embedder_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Predict where proteins go with a trained CELL-E (paper Sec. 4.6, S.3.7): ``protloc predict``.

    For each sequence, conditioned on one nucleus image, writes into ``out``:

    - ``<name>_threshold.png``: the predicted protein-threshold image (uint8 0 / 255; with several
      samples the pixel-wise majority);
    - ``<name>_probability.npy``: the 2D probability density map (Eq. 3), ``float32 [S, S]`` summing to 1;
    - ``<name>_overlay.png``: the map as a heatmap over the nucleus image, with the nucleus-mask outline;

    plus ``nucleus.png`` (the nucleus input as the model sees it, uint8) and ``summary.json`` (what is
    returned). ``<name>`` is the sequence name made file-name safe (characters other than letters,
    digits, ``-``, ``_``, ``.`` become ``_``; repeats get ``_2``, ``_3``, ...). The folder is written
    next to ``out`` and moved into place when complete.

    Parameters
    ----------
    checkpoint
        A ``protloc train celle`` run folder (``best/``, else ``last/``) or checkpoint folder.
    out
        Output folder; an existing non-empty one is refused unless ``overwrite`` (then it is replaced).
    sequences
        ``name -> amino-acid sequence``, or one sequence (named ``query``). Exactly one of
        ``sequences`` and ``fasta``.
    fasta
        FASTA file; record ids name the outputs.
    nucleus
        Nucleus image: a 2-D grey TIFF / PNG / NPY file or array, at least the model's image size on
        each side. Its largest centred square is min-max scaled to [0, 1] (as ``protloc prepare`` scales
        crops) and area-averaged to the model's image size (as CELL-E's data pipeline resizes crops).
        ``None``: a real nucleus shipped with the reference world (the first ``nuclei.npz`` patch not
        completed over a neighbour), centred at the reference world's scale (12 um across at 0.4 um per
        pixel) in a field as wide as the run's training crops (``data.crop_size``, else the paper's
        256 px crops).
    samples, temperature, top_k_fraction, steps, seed
        :class:`protloc.eval.predict.SamplingConfig`: draws per sequence, sampling temperature, share
        of threshold codes kept (paper: 25 %), decoding passes of the masked (CELL-E 2) mode, seed.
    batch_size
        Sequences per generation batch (each batch holds ``batch_size * samples`` rows). The same
        seed, batch size and sequence order give the same outputs.
    device
        Torch device (``None``: CUDA when available).
    precision
        ``"fp32"``, ``"bf16"`` or ``"int8"`` transformer weights (:func:`~protloc.eval.load.set_precision`).
    embedder_path
        ESM-2 / TAPE weights to use instead of the path recorded at training time (when the weights moved);
        ignored by models with one-hot / descriptor / learned residues.
    overwrite
        Replace an existing non-empty ``out``.
    progress
        Show a progress bar over the sequences.

    Returns
    -------
    dict
        The content of ``summary.json``: ``checkpoint``, ``step``, ``mode``, ``image_size``,
        ``max_residues``, ``nucleus`` (source, how it was cropped, mask fraction), ``sampling``,
        ``batch_size``, ``device``, ``seconds`` and ``sequences``: per sequence ``name``, ``file_stem``,
        ``length``, ``window_start`` (0-based) and ``window_end`` (exclusive) of the residues the model
        saw, ``end_token``, ``nucleus_proportion`` (share of the probability map inside the nucleus
        mask, S.3.7), ``threshold_nucleus_proportion`` (share of the predicted threshold pixels inside
        it), ``threshold_fraction``, ``files`` and ``seconds`` (its share of its batch's time).

    Raises
    ------
    InputError
        A missing checkpoint / FASTA / image, an invalid residue (named), a bad nucleus image (wrong
        dimensions, too small, constant, NaN), an existing output.
    ConfigError
        Invalid sampling settings or batch size.
    """
    import time

    import torch
    from tqdm.auto import tqdm

    from protloc.eval.metrics import nucleus_proportion
    from protloc.eval.predict import SamplingConfig, predict

    out = Path(out)
    records = _gather_sequences(sequences, fasta)
    sampling = SamplingConfig(
        temperature=temperature, top_k_fraction=top_k_fraction, seed=seed, steps=steps, samples=samples
    )
    _check_batch_size(batch_size)
    _check_predict_out(out, overwrite)
    t_load = time.perf_counter()
    run, device = _load_celle(checkpoint, device, precision, embedder_path)
    size, max_residues = run.image_size, run.model.config.max_residues
    nuc, nucleus_info = _model_nucleus(run, nucleus)
    load_seconds = time.perf_counter() - t_load
    nuc_t = torch.from_numpy(nuc)[None, None]

    stems = _unique_stems([name for name, _ in records])
    per_seq: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(records), desc="predict", unit="seq", disable=not progress, dynamic_ncols=True)
    with bar, atomic_dir(out) as tmp:
        write_png(tmp / "nucleus.png", (nuc * 255).round().astype(np.uint8))
        mask_np = None
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            t_batch = time.perf_counter()
            result = predict(
                run, [seq for _, seq in batch], nuc_t.expand(len(batch), 1, size, size), sampling=sampling
            )
            prob = result["probability"].float().cpu()
            thr = result["threshold"].float().cpu()
            mask = result["nucleus_mask"].cpu()
            thr_prop = nucleus_proportion(thr, mask).tolist()
            prob_prop = result["nucleus_proportion"].float().cpu().tolist()
            starts = result["window_start"].cpu().tolist()
            ends = result["add_end"].cpu().tolist()
            if mask_np is None:
                mask_np = mask[0, 0].numpy()
            batch_seconds = time.perf_counter() - t_batch
            for i, (name, seq) in enumerate(batch):
                stem = stems[start + i]
                p = prob[i, 0].numpy().astype(np.float32)
                t = thr[i, 0].numpy()
                files = {
                    "threshold": f"{stem}_threshold.png",
                    "probability": f"{stem}_probability.npy",
                    "overlay": f"{stem}_overlay.png",
                }
                write_png(tmp / files["threshold"], (t > 0.5).astype(np.uint8) * 255)
                save_npy(tmp / files["probability"], p)
                fig = plot_prediction(nuc, p, mask=mask_np, title=f"{name} ({len(seq)} aa)")
                _save_fig(fig, tmp / files["overlay"])
                s0 = int(starts[i])
                per_seq.append({
                    "name": name,
                    "file_stem": stem,
                    "length": len(seq),
                    "window_start": s0,
                    "window_end": min(len(seq), s0 + max_residues),
                    "end_token": bool(ends[i]),
                    "nucleus_proportion": float(prob_prop[i]),
                    "threshold_nucleus_proportion": float(thr_prop[i]),
                    "threshold_fraction": float((t > 0.5).mean()),
                    "files": files,
                    "seconds": round(batch_seconds / len(batch), 4),
                })
            bar.update(len(batch))
        summary: dict[str, Any] = {
            "checkpoint": str(run.checkpoint.resolve()),
            "step": run.extra.get("step"),
            "mode": "autoregressive" if run.model.autoregressive else "masked",
            "image_size": size,
            "max_residues": max_residues,
            "nucleus": {**nucleus_info, "file": "nucleus.png", "mask_fraction": float(np.mean(mask_np))},
            "sampling": {
                "samples": sampling.samples,
                "temperature": sampling.temperature,
                "top_k_fraction": sampling.top_k_fraction,
                "steps": sampling.steps,
                "seed": sampling.seed,
            },
            "batch_size": batch_size,
            "device": str(device),
            "precision": precision,
            "load_seconds": round(load_seconds, 3),
            "seconds": round(time.perf_counter() - t0, 3),
            "sequences": per_seq,
        }
        _write_json(tmp / "summary.json", summary)
    logger.info("predicted %d sequence(s) in %.1f s into %s", len(per_seq), summary["seconds"], out)
    return summary


def _default_celle_crop() -> int:
    """The CELL-E crop side of ``protloc prepare`` (the paper's 256 px)."""
    from protloc.data.preprocess import PrepareParams

    return int(PrepareParams().celle_size)


# ------------------------------------------------------------------------------------------ evaluate
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
            raise InputError(
                f"give one --name per --checkpoint ({len(checkpoints)} checkpoint(s), {len(out)} name(s))"
            )
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
    reserved = {"VQGAN ceiling", "sequence baseline"}
    seen: set[str] = set()
    for n in out:
        if n in seen:
            raise InputError(f"model name {n!r} is given twice (names must be unique)")
        if n in reserved:
            raise InputError(f"model name {n!r} is reserved for a reference row")
        seen.add(n)
    return out


def _threshold_to_model(image: np.ndarray, size: int, *, source: str) -> np.ndarray:
    """A 2-D threshold image -> the binary ``[size, size]`` float32 crop a CELL-E tokenizer takes: the
    centred square (as for the nucleus), scaled by its maximum, area-averaged to ``size``, then >= 0.5."""

    def non_negative(arr: np.ndarray) -> None:
        if (arr < 0).any():
            raise InputError("the threshold image has negative pixels", path=source)

    def by_max(crop: np.ndarray) -> np.ndarray:
        top = float(crop.max())
        return crop / top if top > 0 else crop

    out, _ = _square_to_model(image, size, source=source, name="threshold", scale=by_max, check=non_negative)
    return (out >= 0.5).astype(np.float32)


def run_fill(
    *,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    threshold: str | os.PathLike | np.ndarray,
    sequences: Mapping[str, str] | str | None = None,
    fasta: str | os.PathLike | None = None,
    nucleus: str | os.PathLike | np.ndarray | None = None,
    samples: int = 1,
    temperature: float = 1.0,
    top_k_fraction: float = 0.25,
    steps: int = 8,
    seed: int = 0,
    device: str | None = "cpu",
    precision: str = "fp32",
    embedder_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Image to sequence: fill the ``_`` residues of sequences from a nucleus and a threshold image
    (``protloc fill``; CELL-E 2's second direction, :func:`protloc.eval.fill.fill_sequences`).

    The model must be a masked-mode CELL-E trained with ``"text"`` in ``model.masked_segments``. Every
    sequence is filled against the same two images, in ``steps`` passes for all its masked positions.
    Writes into ``out`` (written beside it and moved into place when complete):

    - ``filled.fasta``: per sequence and sample, the filled sequence (``>NAME_sampleK``, ``NAME`` made
      file-name safe and unique as in :func:`run_predict`);
    - ``residues.csv``: per filled position and sample, ``name``, ``sample``, ``position`` (1-based),
      ``residue``, ``probability`` (of that residue), ``step`` (the pass that committed it) and one
      ``p_<residue>`` column per residue of the alphabet;
    - ``residues_<name>.png``: the mean residue probabilities over the samples (residues x positions),
      with the first sample's residues marked;
    - ``nucleus.png``, ``threshold.png`` (the images as the model sees them) and ``summary.json``.

    Parameters
    ----------
    checkpoint
        A ``protloc train celle`` run folder or checkpoint folder.
    out
        Output folder.
    threshold
        The protein-threshold image (path or array): its centred square, scaled by its maximum,
        area-averaged to the model's size and binarised at 0.5.
    sequences, fasta
        ``{name: sequence}`` (or one string) or a FASTA file, with ``_`` at the residues to fill.
    nucleus
        Nucleus image as in :func:`run_predict` (default: the reference nucleus).
    samples, temperature, top_k_fraction, steps, seed
        Sampling (:class:`~protloc.eval.predict.SamplingConfig`); ``top_k_fraction`` of the 20 residues.
    device, precision
        Torch device (``None``: CUDA when available) and transformer weights (``"fp32"`` / ``"bf16"`` / ``"int8"``).
    embedder_path
        ESM-2 / TAPE weights to use instead of the path recorded at training time (when the weights moved);
        ignored by models with one-hot / descriptor / learned residues.
    overwrite
        Replace an existing non-empty ``out``.
    progress
        Log progress.

    Returns
    -------
    dict
        The summary written to ``summary.json``.

    Raises
    ------
    InputError
        Missing files, a sequence without ``_`` or with an invalid residue (named), a sequence longer
        than the model's window, bad images, an existing output.
    ConfigError
        A model not trained to fill residues; invalid sampling settings.
    """
    import time

    import torch

    from protloc.data.sequences import write_fasta
    from protloc.eval.fill import fill_sequences, parse_masked
    from protloc.eval.predict import SamplingConfig

    t0 = time.perf_counter()
    out = Path(out)
    # parse_masked names the sequence and residue on bad input, before anything is loaded.
    records = _gather_sequences(sequences, fasta, check=lambda seq, name: parse_masked(seq, name=name))
    sampling = SamplingConfig(
        temperature=temperature, top_k_fraction=top_k_fraction, seed=seed, steps=steps, samples=samples
    )
    _check_predict_out(out, overwrite)
    run, device = _load_celle(checkpoint, device, precision, embedder_path)
    size = run.image_size
    nuc, nucleus_info = _model_nucleus(run, nucleus)
    if isinstance(threshold, np.ndarray):
        thr_source, thr_raw = "threshold array", threshold
    else:
        thr_source = str(threshold)
        if not Path(threshold).is_file():
            raise InputError("threshold image not found", path=threshold)
        thr_raw = read_image(threshold)
    thr = _threshold_to_model(thr_raw, size, source=thr_source)
    b = len(records)
    nuc_t = torch.from_numpy(nuc)[None, None].expand(b, 1, size, size)
    thr_t = torch.from_numpy(thr)[None, None].expand(b, 1, size, size)
    result = fill_sequences(run, [seq for _, seq in records], nuc_t, thr_t, sampling=sampling)
    alphabet = result["alphabet"]
    stems = _unique_stems([name for name, _ in records])
    rows: list[dict[str, Any]] = []
    per_seq: list[dict[str, Any]] = []
    with atomic_dir(out) as tmp:
        write_png(tmp / "nucleus.png", (nuc * 255).round().astype(np.uint8))
        write_png(tmp / "threshold.png", (thr * 255).astype(np.uint8))
        fasta_records: dict[str, str] = {}
        for i, (name, seq) in enumerate(records):
            positions = result["positions"][i]
            probs = result["probs"][i].numpy()  # [samples, L, A]
            steps_of = result["step"][i].numpy()
            chosen_p = []  # probability of each filled residue, over samples and positions
            for k, filled in enumerate(result["filled"][i]):
                fasta_records[f"{stems[i]}_sample{k + 1}"] = filled  # unique even when names repeat
                for pos in positions:
                    res = filled[pos]
                    chosen_p.append(float(probs[k, pos, alphabet.index(res)]))
                    row = {"name": name, "sample": k + 1, "position": pos + 1, "residue": res,
                           "probability": chosen_p[-1], "step": int(steps_of[k, pos])}
                    row.update({f"p_{a}": float(probs[k, pos, j]) for j, a in enumerate(alphabet)})
                    rows.append(row)  # fmt: skip
            mean = probs[:, positions].mean(axis=0)  # [P, A]
            fig = plot_residue_probabilities(
                mean,
                [p + 1 for p in positions],
                alphabet,
                chosen="".join(result["filled"][i][0][p] for p in positions),
                title=f"{name}: {len(positions)} residue(s) filled, mean of {samples} sample(s)",
            )
            file = f"residues_{stems[i]}.png"
            _save_fig(fig, tmp / file)
            per_seq.append({
                "name": name,
                "length": len(seq),
                "masked": len(positions),
                "filled": result["filled"][i],
                "mean_probability": float(np.mean(chosen_p)),
                "plot": file,
            })  # fmt: skip
        write_fasta(tmp / "filled.fasta", fasta_records)
        table = pd.DataFrame(rows)
        atomic_write_text(tmp / "residues.csv", table.to_csv(index=False))
        summary: dict[str, Any] = {
            "checkpoint": str(run.checkpoint.resolve()),
            "step": run.extra.get("step"),
            "image_size": size,
            "max_residues": run.model.config.max_residues,
            "nucleus": {**nucleus_info, "file": "nucleus.png"},
            "threshold": {"source": thr_source, "file": "threshold.png", "fraction": float(thr.mean())},
            "sampling": dict(vars(sampling)),
            "alphabet": alphabet,
            "device": str(device),
            "precision": precision,
            "sequences": per_seq,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        _write_json(tmp / "summary.json", summary)
    logger.info("filled %d sequence(s) in %.1f s into %s", b, summary["seconds"], out)
    return summary


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
    temperature: float = 1.0,
    top_k_fraction: float = 0.25,
    steps: int = 8,
    sampling_seed: int = 0,
    device: str | None = "cpu",
    precision: str = "fp32",
    embedder_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Image-accuracy tables of CELL-E models on shared crops (paper S.3.7, Tables S.1-S.2): ``protloc evaluate``.

    S.3.7: "we generated a single prediction per image found in the OpenCell set. Each image was randomly
    cropped and flipped similar to training, but cropped regions and flips were maintained between
    models." Every model (:func:`~protloc.eval.evaluate.evaluate_celle`) sees the same crops and flips
    (they are a hash of ``seed`` and the crop index, given the same image / crop size), and so do the
    reference rows: the VQGAN ceiling (:func:`~protloc.eval.evaluate.vqgan_ceiling`) of the *first*
    model's threshold tokenizer and the sequence-only baseline
    (:func:`~protloc.eval.evaluate.sequence_baseline`, fitted on ``train_split`` with the first model's
    crop geometry). Every model samples its tokens with the same :class:`~protloc.eval.predict.SamplingConfig`.

    Writes into ``out`` (a folder written beside it and moved into place when complete):

    - ``metrics.json``: ``proteins`` and ``images`` (row name -> metric -> ``[mean, sd]``, over proteins
      -- every protein counts once -- and over images, the paper's convention; ``null`` for an undefined
      value), ``models`` (per row: checkpoint, step, images, proteins, seconds, ...), ``settings``,
      ``same_crops``, ``table`` / ``table_images`` (the markdown tables) and ``seconds``; this is what is
      returned;
    - ``table.md``: :func:`~protloc.eval.evaluate.format_table` over proteins, then over images;
    - ``per_image.csv``: every row's per-image metrics, with a ``model`` column first;
    - ``per_protein.csv``: per-protein means, with a ``model`` column first.

    Parameters
    ----------
    checkpoints
        ``protloc train celle`` run folders (``best/``, else ``last/``) or checkpoint folders.
    store
        The CELL-E crop store (``celle.zarr`` of ``protloc prepare``).
    out
        Output folder; an existing non-empty one is refused unless ``overwrite`` (then it is replaced).
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
    temperature, top_k_fraction, steps, sampling_seed
        :class:`~protloc.eval.predict.SamplingConfig` of every model (one prediction per image).
    device
        Torch device (``None``: CUDA when available).
    precision
        ``"fp32"``, ``"bf16"`` or ``"int8"`` transformer weights (:func:`~protloc.eval.load.set_precision`).
    embedder_path
        ESM-2 / TAPE weights to use instead of the path recorded at training time (when the weights moved);
        ignored by models with one-hot / descriptor / learned residues.
    overwrite
        Replace an existing non-empty ``out``.
    progress
        Show progress bars.

    Raises
    ------
    InputError
        A missing store / checkpoint / sequence file, a ``names`` count that differs from the
        checkpoints, duplicate names, an existing output, a protein without a sequence.
    ConfigError
        Invalid sampling settings, batch size or ``max_crops``.
    """
    import dataclasses
    import time

    import torch

    from protloc.data.sequences import default_sequences, read_sequences
    from protloc.eval.evaluate import (
        METRICS,
        EvaluationResult,
        evaluate_celle,
        format_table,
        sequence_baseline,
        vqgan_ceiling,
    )
    from protloc.eval.load import load_celle_run
    from protloc.eval.predict import SamplingConfig
    from protloc.models.embedders import EmbedderConfig

    t_start = time.perf_counter()
    out = Path(out)
    ckpts = [Path(c) for c in checkpoints]
    if not ckpts:
        raise InputError("give at least one checkpoint to evaluate")
    row_names = _model_names(ckpts, names)
    sampling = SamplingConfig(
        temperature=temperature, top_k_fraction=top_k_fraction, seed=sampling_seed, steps=steps, samples=1
    )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_crops is not None and (isinstance(max_crops, bool) or not isinstance(max_crops, int) or max_crops < 1):
        raise ConfigError(f"max_crops must be a positive integer or None, got {max_crops!r}")
    _check_predict_out(out, overwrite)
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
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
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
            embedder = EmbedderConfig(path=str(embedder_path)) if embedder_path else None
            loaded[key] = load_celle_run(ckpt, map_location=device, precision=precision, embedder=embedder)
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
            crops, sequences=seqs, train_split=train_split, image_size=first_run.image_size,
            crop_size=int(first_run.extra.get("crop_size") or 0), **common,
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

    table_proteins = format_table(rows, over="proteins")
    table_images = format_table(rows, over="images")
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
    with atomic_dir(out) as tmp:
        summary: dict[str, Any] = {
            "proteins": {name: _metric_table(r.table) for name, r in rows.items()},
            "images": {name: _metric_table(r.table_images) for name, r in rows.items()},
            "models": models,
            "settings": settings,
            "same_crops": bool(same_crops),
            "table": table_proteins,
            "table_images": table_images,
            "seconds": round(time.perf_counter() - t_start, 3),
        }
        note = (
            f"split {split or 'all'}, {len(reference)} crops, seed {seed}, "
            f"{'random crops and flips shared across models' if augment else 'centre crops'} (S.3.7)\n"
        )
        atomic_write_text(
            tmp / "table.md",
            f"# Evaluation\n\n{note}\n## Mean +- sd over proteins\n\n{table_proteins}\n"
            f"## Mean +- sd over images\n\n{table_images}",
        )
        per_image = pd.concat(
            [r.per_image.assign(model=name) for name, r in rows.items()], ignore_index=True, sort=False
        )
        per_image = per_image[_ordered_columns(per_image.columns, METRICS)]
        with atomic_path(tmp / "per_image.csv") as f:
            per_image.to_csv(f, index=False)
        per_protein = pd.concat(
            [r.per_protein.reset_index().assign(model=name) for name, r in rows.items()], ignore_index=True, sort=False
        )
        per_protein = per_protein[_ordered_columns(per_protein.columns, METRICS)]
        with atomic_path(tmp / "per_protein.csv") as f:
            per_protein.to_csv(f, index=False)
        _write_json(tmp / "metrics.json", summary)
    logger.info("evaluation of %d row(s) written to %s in %.1f s", len(rows), out, summary["seconds"])
    return summary


# -------------------------------------------------------------------------------------------- screen
SCREEN_MODES = ("insert", "truncate", "delete", "mutate", "attention")
"""The kinds of ``protloc screen`` (:func:`run_screen_workflow`), one per call."""


def _screen_sequence(
    sequence: str | None, name: str | None, fasta: str | os.PathLike | None, record_id: str | None
) -> tuple[str, str, str]:
    """``(name, sequence, source)`` of the wild type: a given sequence, a FASTA record, or (``record_id``
    alone) one of the engineered constructs shipped with the reference world."""
    if sequence is not None:
        if fasta is not None or record_id is not None:
            raise InputError("give either a sequence or a FASTA record (--fasta / --id), not both")
        label = name or "query"
        return label, validate_sequence(sequence, name=label), "sequence"
    if name is not None:
        raise InputError("--name names a --sequence; a FASTA record is named by its id")
    if fasta is None:
        if record_id is None:
            raise InputError("give a sequence (--sequence) or a FASTA record (--fasta with --id)")
        from protloc.data.world.assets import load_engineered

        constructs = load_engineered()
        if record_id not in constructs:
            raise InputError(
                f"no engineered construct {record_id!r} (shipped: {', '.join(constructs)}); "
                "pass --fasta to read the id from a file"
            )
        return record_id, constructs[record_id], "engineered constructs (protloc/data/world/assets/engineered.fasta)"
    path = Path(fasta)
    if not path.is_file():
        raise InputError("FASTA file not found", path=path)
    records = read_fasta(path)
    if not records:
        raise InputError("the FASTA file holds no sequences", path=path)
    if record_id is None:
        if len(records) > 1:
            raise InputError(f"the FASTA file holds {len(records)} sequences: pick one with --id", path=path)
        record_id = next(iter(records))
    if record_id not in records:
        shown = ", ".join(list(records)[:5]) + (", ..." if len(records) > 5 else "")
        raise InputError(f"no record {record_id!r} in the FASTA file (ids: {shown})", path=path)
    return record_id, records[record_id], str(path)


def _screen_variants(mode: str, seq: str, name: str, opts: Mapping[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """The variants of one screen and the settings that made them (for ``summary.json``)."""
    from protloc.analysis.screens import deletion_scan, insertion_variants, mutational_scan, truncation_series

    n = len(seq)
    if mode == "insert":
        peptides = dict(opts.get("peptides") or {})
        at = list(opts.get("at") or ["end"])
        for p in at:
            if isinstance(p, int) and not isinstance(p, bool) and not 0 <= p <= n:
                raise InputError(f"insertion point {p} is outside 0..{n} (residues before the insertion)")
        variants = insertion_variants(seq, peptides, at, seq_name=name)
        return variants, {"peptides": peptides, "at": at}
    if mode == "truncate":
        step, from_, min_length = opts.get("step"), opts.get("from_", "n"), opts.get("min_length", 1)
        variants = truncation_series(seq, step=step, from_=from_, min_length=min_length, seq_name=name)
        if len(variants) == 1:
            raise InputError(f"no truncation of {step} residues leaves at least {min_length} of {n}")
        return variants, {"step": step, "from": from_, "min_length": min_length}
    if mode == "delete":
        window, step = opts.get("window"), opts.get("step")
        variants = deletion_scan(seq, window=window, step=step, seq_name=name)
        return variants, {"window": window, "step": window if step is None else step}
    if mode == "mutate":
        residues, positions = opts.get("residues", "A"), opts.get("positions")
        if positions is not None:
            positions = list(positions)
            bad = [p + 1 for p in positions if not 0 <= p < n]
            if bad:
                raise InputError(f"position(s) {bad[:5]} (1-based) outside the sequence of {n} residues")
        variants = mutational_scan(seq, residues=residues, positions=positions, seq_name=name)
        if len(variants) == 1:
            raise InputError("no substitutions: every chosen position already holds the target residue")
        where = "all" if positions is None else [p + 1 for p in positions]
        return variants, {"residues": residues, "positions_1based": where}
    raise ConfigError(f"screen mode must be one of {', '.join(SCREEN_MODES)}, got {mode!r}")


def run_screen_workflow(
    *,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    mode: str,
    sequence: str | None = None,
    name: str | None = None,
    fasta: str | os.PathLike | None = None,
    record_id: str | None = None,
    nucleus: str | os.PathLike | np.ndarray | None = None,
    peptides: Mapping[str, str] | None = None,
    at: Sequence[int | str] = ("end",),
    step: int | None = None,
    from_: str = "n",
    min_length: int = 1,
    window: int | None = None,
    residues: str = "A",
    positions: Sequence[int] | None = None,
    method: str = "rollout",
    present_min: float = 0.5,
    background_max: float = 0.5,
    samples: int = 1,
    temperature: float = 1.0,
    top_k_fraction: float = 0.25,
    steps: int = 8,
    seed: int = 0,
    batch_size: int = 8,
    device: str | None = "cpu",
    precision: str = "fp32",
    embedder_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """In-silico screen of one protein with a trained CELL-E (paper Fig. 4-6, S.3.8): ``protloc screen``.

    One ``mode`` per call (:mod:`protloc.analysis.screens`):

    - ``"insert"``: every peptide of ``peptides`` (name -> sequence) at every point of ``at`` (``"start"``,
      ``"end"`` or ``i`` = after ``i`` residues, 0..len): the GFP + NLS experiment of Fig. 4;
    - ``"truncate"``: terminal truncations by multiples of ``step`` from ``from_`` (``"n"`` / ``"c"``),
      keeping at least ``min_length`` residues: the TOP1 series of Fig. 5;
    - ``"delete"``: internal deletions of ``window`` residues, sliding by ``step`` (default ``window``);
    - ``"mutate"``: point substitutions to ``residues`` (one-letter codes or ``"all"``) at ``positions``
      (0-based; default every residue);
    - ``"attention"``: the residues attended by protein-present vs background patches of one generated
      threshold image (``method`` ``"rollout"`` or ``"mean"``, patch groups by ``present_min`` /
      ``background_max``, S.3.8).

    Every variant is predicted against the same nucleus image (``nucleus`` as in :func:`run_predict`,
    default the reference nucleus) with the same sampling noise (common random numbers), so a ``delta``
    reflects the sequence change. Writes into ``out`` (a folder written beside it and moved into place when
    complete): ``screen.csv`` (the :func:`~protloc.analysis.screens.run_screen` table, wild type first),
    ``screen.png`` (:func:`~protloc.plotting.screens.plot_screen`) and ``summary.json``; for ``"attention"``
    ``attention.csv`` (``residue``, ``position`` 1-based, ``present``, ``background``, ``difference``),
    ``attention.png`` and ``summary.json``.

    The wild type is ``sequence`` (named ``name``, default ``query``), or record ``record_id`` of
    ``fasta`` (may be left out for a one-record file), or -- ``record_id`` without ``fasta`` -- one of the
    engineered constructs shipped with the reference world (``GFP``, ``GFP_NLS_nucleoplasmin``, ``TOP1``, ...).

    Returns
    -------
    dict
        The content of ``summary.json``: ``mode``, ``settings`` (the mode's options, sampling, batch size,
        device), ``sequence`` (name, length, source), ``checkpoint``, ``step``, ``model_window``
        (``max_residues``), ``nucleus``, ``warnings``, ``files``, ``seconds`` and, for a screen,
        ``variants``, ``wild_type_nucleus_proportion``, ``top_variants`` (the 5 largest ``|delta|``) and
        ``outside_window`` (variants whose model input equals the wild type's: the change lies beyond the
        model's N-terminal window); for attention, ``window``, ``n_present`` / ``n_background`` and
        ``top_residues`` (the 5 largest present - background differences).

    Raises
    ------
    InputError
        A missing checkpoint / FASTA / record / image, an invalid residue (named), positions outside the
        sequence, an existing output.
    ConfigError
        An unknown mode or method, invalid sampling settings or batch size.
    """
    import dataclasses
    import time

    import torch

    from protloc.analysis.screens import residue_attention, run_screen
    from protloc.eval.predict import SamplingConfig
    from protloc.plotting.screens import plot_residue_attention, plot_screen

    t0 = time.perf_counter()
    out = Path(out)
    if mode not in SCREEN_MODES:
        raise ConfigError(f"screen mode must be one of {', '.join(SCREEN_MODES)}, got {mode!r}")
    if mode == "attention" and method not in ("rollout", "mean"):
        raise ConfigError(f"attention method must be 'rollout' or 'mean', got {method!r}")
    seq_name, seq, seq_source = _screen_sequence(sequence, name, fasta, record_id)
    sampling = SamplingConfig(
        temperature=temperature, top_k_fraction=top_k_fraction, seed=seed, steps=steps, samples=samples
    )
    _check_batch_size(batch_size)
    if mode != "attention":
        opts = {"peptides": peptides, "at": at, "step": step, "from_": from_, "min_length": min_length,
                "window": window, "residues": residues, "positions": positions}  # fmt: skip
        variants, mode_settings = _screen_variants(mode, seq, seq_name, opts)
    else:
        variants, mode_settings = [], {"method": method, "present_min": present_min, "background_max": background_max}
    _check_predict_out(out, overwrite)
    run, device = _load_celle(checkpoint, device, precision, embedder_path)
    nuc, nucleus_info = _model_nucleus(run, nucleus)
    nuc_t = torch.from_numpy(nuc)[None, None]
    max_residues = run.model.config.max_residues
    sampling_settings = dataclasses.asdict(sampling)
    if mode == "attention":
        sampling_settings.pop("samples")  # one draw
    summary: dict[str, Any] = {
        "mode": mode,
        "settings": {**mode_settings, "sampling": sampling_settings, "batch_size": batch_size, "device": str(device),
                     "precision": precision},
        "sequence": {"name": seq_name, "length": len(seq), "source": seq_source},
        "checkpoint": str(run.checkpoint.resolve()),
        "step": run.extra.get("step"),
        "model_window": max_residues,
        "nucleus": nucleus_info,
    }
    warnings: list[str] = []
    with atomic_dir(out) as tmp:
        if mode == "attention":
            res = residue_attention(
                run, seq, nuc_t, sampling=sampling, method=method,  # type: ignore[arg-type]
                present_min=present_min, background_max=background_max,
            )  # fmt: skip
            table = pd.DataFrame({
                "residue": list(res["residues"]),
                "position": res["positions"],
                "present": res["present"],
                "background": res["background"],
                "difference": res["difference"],
            })
            with atomic_path(tmp / "attention.csv") as f:
                table.to_csv(f, index=False)
            fig = plot_residue_attention(res, seq)
            fig.axes[0].set_title(f"{seq_name}: residue attention ({method}, S.3.8)", fontsize=10)
            _save_fig(fig, tmp / "attention.png")
            start, n_res = int(res["window_start"]), len(res["residues"])
            if n_res < len(seq):
                warnings.append(
                    f"the model sees residues {start + 1}-{start + n_res} of {len(seq)}: "
                    "the attention covers only those"
                )
            for group, count in (("present", res["n_present"]), ("background", res["n_background"])):
                if count == 0:
                    warnings.append(f"no {group} patches in the generated threshold image: its column is empty (NaN)")
            finite = table[np.isfinite(table["difference"])]
            top = finite.reindex(finite["difference"].sort_values(ascending=False, kind="stable").index).head(5)
            summary.update({
                "window": {"start": start + 1, "end": start + n_res},
                "n_present": res["n_present"],
                "n_background": res["n_background"],
                "top_residues": top.to_dict(orient="records"),
                "files": ["attention.csv", "attention.png", "summary.json"],
            })
        else:
            df = run_screen(run, variants, nuc_t, sampling=sampling, batch_size=batch_size, progress=progress)
            with atomic_path(tmp / "screen.csv") as f:
                df.to_csv(f, index=False)
            wt = float(df["nucleus_proportion"].iloc[0])
            title = f"{seq_name}: {mode} screen (wild type nucleus proportion {wt:.3f})"
            _save_fig(plot_screen(df, title=title), tmp / "screen.png")
            rest = df.iloc[1:]
            unchanged = [str(v) for v in rest.loc[~rest["input_changed"].astype(bool), "name"]]
            if unchanged:
                warnings.append(
                    f"{len(unchanged)} of {len(rest)} variant(s) change the sequence only beyond the model's "
                    f"{max_residues}-residue N-terminal window: their input equals the wild type's (delta 0)"
                )
            order = rest["delta"].abs().sort_values(ascending=False, kind="stable").index
            top_cols = ["name", "kind", "position", "detail", "nucleus_proportion", "delta", "input_changed"]
            top_rows = []
            for rec in rest.loc[order[:5], top_cols].to_dict(orient="records"):
                rec["position"] = None if pd.isna(rec["position"]) else int(rec["position"])
                rec["input_changed"] = bool(rec["input_changed"])
                top_rows.append(rec)
            summary.update({
                "variants": len(df),
                "wild_type_nucleus_proportion": wt,
                "top_variants": top_rows,
                "outside_window": unchanged,
                "files": ["screen.csv", "screen.png", "summary.json"],
            })
        for w in warnings:
            logger.warning("%s", w)
        summary["warnings"] = warnings
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        _write_json(tmp / "summary.json", summary)
    logger.info("%s screen of %s written to %s in %.1f s", mode, seq_name, out, summary["seconds"])
    return summary
