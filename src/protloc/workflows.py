"""File-level workflows behind the commands: read inputs, compute, plot, write a results folder.

This is the top of the import order below ``cli`` (``... -> analysis -> plotting -> workflows ->
cli``): each function here is what one command does, callable from Python with keyword arguments.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from protloc._fs import atomic_path, atomic_write_text
from protloc.analysis.atlas import atlas as compute_atlas
from protloc.analysis.interpret import feature_zeroing, top_codes
from protloc.analysis.spectrum import bicluster, consensus_spectra, family_correlation, spectra_from_indices
from protloc.data.io import CropStore, read_table
from protloc.errors import InputError
from protloc.eval.embed import load_cytoself, read_obsm
from protloc.plotting.atlas import atlas_html, plot_atlas
from protloc.plotting.crops import composite
from protloc.plotting.interpret import plot_feature_zeroing
from protloc.plotting.spectrum import plot_family_correlation, plot_feature_spectrum, plot_spectrum_heatmap

logger = logging.getLogger(__name__)

__all__ = ["run_atlas", "run_interpret", "run_spectrum"]


def _save_fig(fig, path: Path, *, dpi: int = 120) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    return path


def _safe_name(name: str) -> str:
    """A file-name-safe version of a protein id."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, float) and not np.isfinite(o):
        return None
    return str(o)


def _write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _load_split(embeddings: str | os.PathLike, split: str | None, keys: Sequence[str]) -> ad.AnnData:
    """An in-memory AnnData with only the rows of ``split`` and only the ``obsm`` keys asked for."""
    path = Path(embeddings)
    if not path.is_file():
        raise InputError("embeddings file not found", path=path)
    backed = ad.read_h5ad(path, backed="r")
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
