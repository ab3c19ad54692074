"""``protloc spectrum``: feature spectra, biclustering and localization-family correlations (cytoself Fig. 4).

- :func:`spectra`: per-protein code histograms (proteins x codes) of an AnnData and their biclustering;
- :func:`run_spectrum`: the command: spectra, feature clusters, heatmap and, per query protein, its
  spectrum and family correlations.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from protloc._fs import atomic_dir
from protloc.analysis.spectrum import SpectrumOrder
from protloc.commands._output import check_out, safe_name, save_fig, write_csv, write_json
from protloc.commands.atlas import load_embeddings
from protloc.errors import ConfigError, InputError

__all__ = ["run_spectrum", "spectra"]

#: ``obsm`` key of the code indices of each level.
_INDEX_KEYS = {"local": "local_indices", "global": "global_indices"}


def spectra(
    adata: ad.AnnData, *, level: str = "local", n_clusters: int = 11, group_key: str = "protein_id"
) -> tuple[pd.DataFrame, SpectrumOrder]:
    """Feature spectra (proteins x codes) and their biclustering (cytoself Fig. 4).

    Parameters
    ----------
    adata
        Embeddings with ``obsm["local_indices"]`` / ``obsm["global_indices"]`` (``protloc embed``).
    level
        ``"local"`` (VQ1 indices, as the paper) or ``"global"`` (VQ2 indices).
    n_clusters
        Top-level feature clusters (the paper's 11).
    group_key
        ``obs`` column the spectra are taken over (one row per value).

    Returns
    -------
    spectra : pandas.DataFrame
        Per-protein code frequencies (rows sum to 1).
    order : SpectrumOrder
        The biclustering (:func:`~protloc.analysis.spectrum.bicluster`): ``order.apply(spectra)``
        reorders, and the feature clusters are in ``order.feature_clusters``; draw them with
        :func:`~protloc.plotting.spectrum.plot_spectrum_heatmap`.

    Raises
    ------
    ConfigError
        An unknown level.
    InputError
        ``adata`` without the level's code indices.
    """
    from protloc.analysis.spectrum import bicluster, spectra_from_indices

    key = _INDEX_KEYS.get(level)
    if key is None:
        raise ConfigError(f"level must be 'local' or 'global', got {level!r}")
    if key not in adata.obsm:
        raise InputError(f"adata has no obsm[{key!r}] (use protloc embed / protloc.api.embed)")
    info = adata.uns.get("cytoself", {})
    k = int(info.get("codebook_size1" if level == "local" else "codebook_size2", 0)) or None
    groups = adata.obs[group_key].astype(str).to_numpy()
    spec = spectra_from_indices(np.asarray(adata.obsm[key]), groups, codebook_size=k)
    return spec, bicluster(spec, n_clusters=n_clusters)


def run_spectrum(
    embeddings: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: str | None = None,
    label_key: str = "label",
    queries: Sequence[str] = (),
    n_clusters: int = 11,
    level: str = "local",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Feature spectra, biclustering and localization-family correlations (paper Fig. 4): ``protloc spectrum``.

    Writes ``spectra.csv`` (proteins x codes, frequencies, biclustered order), ``feature_clusters.csv``
    (code -> cluster i..xi), ``spectrum_heatmap.png`` and, per query protein,
    ``spectrum_<protein>.png`` + ``families_<protein>.csv`` / ``.png``, and ``spectrum.json`` (what is
    returned) into ``out`` (a folder written beside it and moved into place when complete).

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
    overwrite
        Replace an existing non-empty ``out``.

    Returns
    -------
    dict
        ``proteins``, ``codes``, ``used_codes``, ``clusters`` and ``queries`` (per query protein: its
        ``label``, ``best_family`` and the correlation ``r``).
    """
    from protloc.analysis.spectrum import consensus_spectra, family_correlation
    from protloc.plotting.spectrum import plot_family_correlation, plot_feature_spectrum, plot_spectrum_heatmap

    key = _INDEX_KEYS.get(level)
    if key is None:
        raise InputError(f"level must be local or global, got {level!r}")
    out = check_out(out, overwrite=overwrite, inputs={"--embeddings": embeddings})
    adata = load_embeddings(embeddings, split=split, keys=[key])
    spec, order = spectra(adata, level=level, n_clusters=n_clusters)
    for q in queries:
        if q not in spec.index:
            raise InputError(f"protein {q!r} has no crops in these embeddings", path=embeddings)
    labels = (
        adata.obs.drop_duplicates("protein_id").set_index("protein_id")[label_key].astype(str)
        if label_key in adata.obs
        else pd.Series(dtype=str)
    )
    consensus = consensus_spectra(spec, labels) if len(labels) else None
    clusters = pd.DataFrame({"code": np.arange(len(order.feature_clusters)), "cluster": order.feature_clusters})
    clusters["cluster_name"] = clusters["cluster"].map(order.cluster_names)
    clusters["position"] = np.argsort(order.feature_order)
    summary: dict[str, Any] = {
        "proteins": int(spec.shape[0]),
        "codes": int(spec.shape[1]),
        "used_codes": int(len(order.used_features)),
        "clusters": int(order.n_clusters),
        "queries": {},
    }
    with atomic_dir(out) as tmp:
        write_csv(order.apply(spec), tmp / "spectra.csv", index=True)
        write_csv(clusters.sort_values("position"), tmp / "feature_clusters.csv")
        save_fig(plot_spectrum_heatmap(spec, order), tmp / "spectrum_heatmap.png")
        for q in queries:
            safe = safe_name(q)
            save_fig(plot_feature_spectrum(spec, q, order), tmp / f"spectrum_{safe}.png")
            if consensus is not None and len(consensus):
                corr = family_correlation(q, consensus, spectra=spec, labels=labels)
                write_csv(corr.rename("pearson_r"), tmp / f"families_{safe}.csv", index=True)
                save_fig(plot_family_correlation(corr, highlight=labels.get(q)), tmp / f"families_{safe}.png")
                summary["queries"][q] = {
                    "label": labels.get(q, ""),
                    "best_family": str(corr.index[0]),
                    "r": float(corr.iloc[0]),
                }
        write_json(tmp / "spectrum.json", summary)
    return summary
