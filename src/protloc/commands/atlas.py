"""``protloc atlas``: UMAP localization atlas, clustering scores and k-NN macro-F1 (cytoself paper Fig. 2, 6).

- :func:`load_embeddings`: the crops of one split of a ``protloc embed`` file, as an in-memory AnnData;
- :func:`atlas`: UMAP + scores of an AnnData (:func:`protloc.analysis.atlas.atlas`), adds ``obsm["X_umap"]``;
- :func:`run_atlas`: the command: ``atlas.png``, ``atlas.html``, ``umap.csv`` and ``scores.json``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from protloc._fs import atomic_dir
from protloc.analysis.atlas import atlas as compute_atlas
from protloc.commands._output import check_out, save_fig, write_csv, write_json
from protloc.data.io import CropStore, read_table
from protloc.errors import InputError

logger = logging.getLogger(__name__)

__all__ = ["atlas", "load_embeddings", "read_complexes", "run_atlas", "thumbnails"]


def load_embeddings(
    embeddings: str | os.PathLike, *, split: str | None = None, keys: Sequence[str] = ("global",)
) -> ad.AnnData:
    """An in-memory AnnData with only the rows of ``split`` and only the ``obsm`` keys asked for.

    Parameters
    ----------
    embeddings
        ``.h5ad`` from ``protloc embed``; only ``obs``, ``uns`` and the ``keys`` rows of ``split`` are read.
    split
        Crops of this split (``None``: all crops).
    keys
        ``obsm`` arrays to read (``global``, ``local_indices``, ...).

    Raises
    ------
    InputError
        A missing or unreadable file, no ``split`` column, no crops in ``split``.
    """
    from protloc.eval.embed import read_obsm

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

    Parameters
    ----------
    adata
        Embeddings (``obsm["global"]``), e.g. from :func:`protloc.commands.embed.embed`.
    label_key
        ``obs`` column of localization labels.
    split
        ``None`` maps every crop of ``adata`` (give ``"test"`` to map only the test crops, as the paper).
    complexes
        Protein -> complex, for the complex-level clustering score.
    random_state
        UMAP random state.
    **kwargs
        Other options of :func:`protloc.analysis.atlas.atlas`.

    Returns
    -------
    dict
        The scores (``clustering_score``, ``knn``, ``n_crops``, ``n_proteins``, ...).
    """
    return compute_atlas(
        adata, label_key=label_key, split=split, complexes=complexes, random_state=random_state, **kwargs
    )


def read_complexes(complexes: str | os.PathLike | Mapping[str, str] | None) -> dict[str, str] | None:
    """Protein -> complex from a mapping or a CSV/TSV with ``protein_id`` and ``complex`` (``None`` stays)."""
    if complexes is None:
        return None
    if isinstance(complexes, Mapping):
        return {str(k): str(v) for k, v in complexes.items()}
    t = read_table(complexes, required=("protein_id", "complex"), unique=("protein_id",))
    return dict(zip(t["protein_id"].astype(str), t["complex"].astype(str), strict=True))


def check_store_matches(
    crops: CropStore,
    obs: pd.DataFrame,
    *,
    embeddings: str | os.PathLike | None = None,
    uns: Mapping[str, Any] | None = None,
) -> None:
    """Refuse a crop store that is not the one ``obs`` (an embedding's rows) was embedded from.

    The store's fingerprint must be the one ``protloc embed`` recorded in ``uns`` (when given), and each row's
    ``crop_index`` must exist in the store and show the same protein and field of view; a store of another
    run would otherwise put other proteins' crops beside the points of the atlas.
    """
    idx = obs["crop_index"].to_numpy().astype(np.int64)
    source = f" (the embeddings {embeddings})" if embeddings is not None else ""
    recorded = (uns or {}).get("cytoself", {}).get("store_fingerprint")
    if recorded is not None and recorded != crops.fingerprint:
        raise InputError(
            f"this store is not the one the embeddings{source} came from "
            f"({(uns or {}).get('cytoself', {}).get('store')}): it holds other crops",
            path=crops.path,
        )
    if len(idx) and (idx.min() < 0 or idx.max() >= len(crops)):
        raise InputError(
            f"this store has {len(crops)} crops but the embeddings{source} refer to crop {int(idx.max())}: "
            "give the store they were embedded from",
            path=crops.path,
        )
    for col in ("protein_id", "fov_id"):
        if col in obs.columns and col in crops.obs.columns:
            mine = crops.obs[col].astype(str).to_numpy()[idx]
            theirs = obs[col].astype(str).to_numpy()
            bad = np.flatnonzero(mine != theirs)
            if len(bad):
                j = int(bad[0])
                raise InputError(
                    f"this store is not the one the embeddings{source} came from: crop {int(idx[j])} is "
                    f"{col} {mine[j]!r} here but {theirs[j]!r} in the embeddings ({len(bad)} rows differ)",
                    path=crops.path,
                )


def thumbnails(crops: CropStore, obs: pd.DataFrame, max_n: int) -> list[np.ndarray | None]:
    """RGB composites (nucleus + protein) of at most ``max_n`` crops spread evenly over ``obs``; ``None`` elsewhere.

    ``crops`` must be the store the embeddings came from (check it first with :func:`check_store_matches`).
    """
    from protloc.plotting.crops import composite

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
    overwrite: bool = False,
) -> dict[str, Any]:
    """UMAP localization atlas, clustering scores and k-NN macro-F1 of one split (paper Fig. 2, 6): ``protloc atlas``.

    Writes ``atlas.png``, ``atlas.html`` (self-contained, hover shows protein, label and crop when
    ``store`` is given), ``umap.csv`` and ``scores.json`` into ``out`` (a folder written beside it and
    moved into place when complete).

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
    overwrite
        Replace an existing non-empty ``out``.

    Returns
    -------
    dict
        The scores written to ``scores.json`` (:func:`atlas`).
    """
    from protloc.plotting.atlas import atlas_html, plot_atlas

    out = check_out(
        out, overwrite=overwrite, inputs={"--embeddings": embeddings, "--store": store, "--complexes": complexes}
    )
    adata = load_embeddings(embeddings, split=split, keys=["global"])
    crops = CropStore.open(store) if store is not None else None
    if crops is not None:  # before the UMAP: a store of another run is refused at once
        check_store_matches(crops, adata.obs, embeddings=embeddings, uns=adata.uns)
    cmap = read_complexes(complexes)
    # UMAP has no progress to report; say what is running (about a minute for 6,000 crops on 2 cores)
    logger.info("UMAP and k-NN scores of %d crops ...", adata.n_obs)
    result = atlas(adata, label_key=label_key, complexes=cmap, split=None, random_state=seed)
    coords = adata.obsm["X_umap"]
    thumbs = thumbnails(crops, adata.obs, max_thumbnails) if crops is not None else None
    title = f"{split or 'all'} crops"
    columns = [c for c in ("crop_index", "protein_id", "fov_id", "split", label_key) if c in adata.obs]
    table = adata.obs[columns].copy()
    table["umap1"], table["umap2"] = coords[:, 0], coords[:, 1]
    with atomic_dir(out) as tmp:
        save_fig(plot_atlas(adata, color=label_key, title=f"cytoself atlas ({title})"), tmp / "atlas.png", dpi=130)
        atlas_html(
            coords,
            adata.obs,
            path=tmp / "atlas.html",
            color=label_key,
            thumbnails=thumbs,
            thumbnail_size=thumbnail_size,
            title=f"protloc cytoself atlas ({title})",
        )
        write_csv(table, tmp / "umap.csv")
        write_json(tmp / "scores.json", result)
    return result
