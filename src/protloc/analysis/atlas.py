"""The protein localization atlas: UMAP of the global representation, clustering scores, k-NN F1.

cytoself paper (Kobayashi et al.), Results "High-resolution protein localization atlas" and Methods
"Dimensionality reduction and clustering" / "Clustering score":

* the atlas is a UMAP (umap-learn defaults: Euclidean metric, 15 neighbours, ``min_dist`` 0.1) of the
  flattened global quantized representation of every test-set crop;
* the clustering score measures, in those 2-D coordinates, how far apart the class centres are
  relative to how spread out each class is: ``sigma*({mu*(C_k)}_k) / mu*({sigma*(C_k)}_k)`` with
  ``mu*`` the median and ``sigma*`` a robust spread computed with medians (see
  :func:`clustering_score`);
* ground truth comes at two scales: organelle-level localization labels and protein complexes.

Besides the paper's score we report a k-nearest-neighbour localization classifier (macro-F1), the
metric later embedding papers use on OpenCell. A crop's neighbours from its own protein are excluded,
otherwise the score measures protein identity (which the ID pretext task trains for) rather than
localization.

Everything here takes plain arrays; the AnnData entry points (:func:`umap_embedding`, :func:`atlas`)
store their results in the AnnData they are given (``obsm`` / ``uns``), scanpy-style.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from protloc.errors import InputError

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "atlas",
    "clustering_score",
    "knn_macro_f1",
    "protein_level_table",
    "umap_embedding",
]

# Budget for one block of the exact k-NN search: a [block, n] float matrix of this many elements
# (~128 MiB in float32), plus a boolean mask of the same shape in the worst case.
_KNN_BLOCK_ELEMENTS = 2**25


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _features(adata: AnnData, use_rep: str) -> np.ndarray:
    """Return ``adata.obsm[use_rep]`` (or ``adata.X`` for ``"X"``) as a 2-D float array."""
    if use_rep == "X":
        x = adata.X
    elif use_rep in adata.obsm:
        x = adata.obsm[use_rep]
    else:
        raise InputError(f"representation {use_rep!r} not found in adata.obsm (have: {sorted(adata.obsm)})")
    if hasattr(x, "toarray"):  # scipy sparse
        x = x.toarray()
    x = np.asarray(x)
    if x.ndim != 2:
        x = x.reshape(x.shape[0], -1)
    if x.shape[1] == 0:
        raise InputError(f"representation {use_rep!r} has no columns")
    return x


def _missing(values: np.ndarray, exclude: Iterable[Hashable]) -> np.ndarray:
    """Boolean mask of entries that are missing (None / NaN) or in ``exclude``."""
    s = pd.Series(values, dtype=object)
    out = s.isna().to_numpy()
    excl = list(exclude)
    if excl:
        out |= s.isin(excl).to_numpy()
    return out


def _as_labels(labels: Sequence[Hashable] | np.ndarray | pd.Series, n: int, what: str) -> np.ndarray:
    arr = np.asarray(labels, dtype=object).reshape(-1)
    if arr.shape[0] != n:
        raise InputError(f"{what} has {arr.shape[0]} entries for {n} points")
    return arr


# --------------------------------------------------------------------------------------------------
# UMAP
# --------------------------------------------------------------------------------------------------


def umap_embedding(
    adata: AnnData | np.ndarray,
    *,
    use_rep: str = "global",
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    metric: str = "euclidean",
    random_state: int | None = 0,
    max_points: int | None = None,
    n_epochs: int | None = None,
    key_added: str = "X_umap",
    verbose: bool = False,
) -> np.ndarray:
    """Project a representation to 2-D with UMAP (paper Methods: umap-learn defaults).

    Parameters
    ----------
    adata
        AnnData with the representation in ``obsm[use_rep]`` (``"X"`` for ``adata.X``), or the
        ``[N, D]`` feature array itself (then nothing is stored).
    use_rep
        Key of the representation; ``"global"`` is the flattened global quantized representation
        written by ``protloc embed``.
    n_neighbors, min_dist, metric
        UMAP parameters; the defaults are umap-learn's, which the paper used. ``n_neighbors`` is
        clipped to ``N - 1`` for tiny inputs.
    random_state
        Seed for a reproducible layout. umap-learn then runs single-threaded; ``None`` lets it use
        all cores (layouts then differ run to run).
    max_points
        For very large N: fit UMAP on a random subset of this many points and place the others with
        ``UMAP.transform`` (faster and lighter, an approximation of the full fit). ``None`` fits all.
    n_epochs
        Optimisation epochs (``None``: umap-learn's default, 200 for large and 500 for small N).
    key_added
        ``adata.obsm`` key of the result; parameters go to ``adata.uns[key_added + "_params"]``.
    verbose
        Pass through to umap-learn.

    Returns
    -------
    numpy.ndarray
        ``[N, 2]`` float32 coordinates.

    Notes
    -----
    umap-learn compiles its kernels with numba on the first call in a process: about 10 s for a few
    hundred points, 45 s for N >= 4096 (nearest-neighbour descent). Measured on 2 CPU cores for
    N = 20,000 points of dimension 144: 56 s cold, 10 s warm (seeded); ``max_points=5000``: 8 s warm.
    """
    from anndata import AnnData

    is_adata = isinstance(adata, AnnData)
    x = _features(adata, use_rep) if is_adata else np.asarray(adata)
    if x.ndim != 2:
        raise InputError(f"features must be 2-D [N, D], got shape {x.shape}")
    n = x.shape[0]
    if n < 4:
        raise InputError(f"UMAP needs at least 4 points, got {n}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise InputError("features contain NaN or infinite values")
    if n_neighbors < 2:
        raise ValueError(f"n_neighbors must be >= 2, got {n_neighbors}")
    if max_points is not None and max_points < 4:
        raise ValueError(f"max_points must be >= 4, got {max_points}")

    import umap  # slow import (numba); only when needed

    fit_idx = np.arange(n)
    if max_points is not None and n > max_points:
        rng = np.random.default_rng(random_state)
        fit_idx = np.sort(rng.choice(n, size=max_points, replace=False))
    reducer = umap.UMAP(
        n_neighbors=min(n_neighbors, len(fit_idx) - 1),
        min_dist=min_dist,
        metric=metric,
        random_state=random_state,
        n_epochs=n_epochs,
        n_components=2,
        verbose=verbose,
    )
    with warnings.catch_warnings():
        # "n_jobs value 1 overridden to 1 by setting random_state": expected with a seed.
        warnings.filterwarnings("ignore", message=".*n_jobs.*overridden.*")
        warnings.filterwarnings("ignore", message=".*gradient function is not yet implemented.*")
        coords = np.empty((n, 2), dtype=np.float32)
        coords[fit_idx] = reducer.fit_transform(x[fit_idx])
        if len(fit_idx) < n:
            rest = np.setdiff1d(np.arange(n), fit_idx, assume_unique=True)
            coords[rest] = reducer.transform(x[rest])

    if is_adata:
        adata.obsm[key_added] = coords
        adata.uns[f"{key_added}_params"] = {
            "use_rep": use_rep,
            "n_neighbors": int(reducer.n_neighbors),
            "min_dist": float(min_dist),
            "metric": str(metric),
            "random_state": -1 if random_state is None else int(random_state),
            "n_fit": len(fit_idx),
        }
    return coords


# --------------------------------------------------------------------------------------------------
# clustering score
# --------------------------------------------------------------------------------------------------


def _group_medians(coords: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median coordinates and the (single) label of every group."""
    codes, uniq = pd.factorize(pd.Series(groups, dtype=object), sort=False)
    if (codes < 0).any():
        raise InputError("groups contain missing values")
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    pieces = np.split(order, bounds)
    med = np.stack([np.median(coords[p], axis=0) for p in pieces])
    lab = np.empty(len(pieces), dtype=object)
    for i, p in enumerate(pieces):
        vals = pd.unique(pd.Series(labels[p], dtype=object))
        if len(vals) != 1:
            raise InputError(f"group {uniq[codes[p[0]]]!r} has several labels: {list(vals)[:5]}")
        lab[i] = vals[0]
    return med, lab


def clustering_score(
    coords: np.ndarray,
    labels: Sequence[Hashable] | np.ndarray | pd.Series,
    *,
    exclude: Iterable[Hashable] = ("",),
    groups: Sequence[Hashable] | np.ndarray | pd.Series | None = None,
    min_points: int = 2,
) -> float:
    """The cytoself clustering score: spread of class centres over the typical class size.

    Paper, Methods "Clustering score": ``sigma*({mu*(C_k)}_k) / mu*({sigma*(C_k)}_k)``, with
    ``mu*`` the (coordinate-wise) median and ``sigma*`` a robust spread computed with medians:

    * centre of class k: ``c_k`` = coordinate-wise median of its points;
    * size of class k: ``s_k`` = median Euclidean distance of its points to ``c_k``;
    * spread of the classes: median Euclidean distance of the centres ``c_k`` to their own
      coordinate-wise median;
    * score = spread / median over k of ``s_k``.

    Higher is better. The score is invariant to translating and uniformly scaling the coordinates.

    Parameters
    ----------
    coords
        ``[N, m]`` points (the 2-D UMAP in the paper).
    labels
        Class of every point (localization category, or protein complex).
    exclude
        Labels that mean "no class" (unknown / mixed localization); missing values (None, NaN) are
        always excluded.
    groups
        Optional group (protein id) of every point. ``None`` (the paper): score the individual
        crops. Given: every group is first replaced by the median of its points, and the score is
        computed over groups, so proteins with many crops do not dominate. All points of a group
        must share a label.
    min_points
        Classes with fewer points (groups, when ``groups`` is given) are ignored; at least 2, since a
        single point has no size.

    Returns
    -------
    float
        The score; ``inf`` when every class has zero size but the centres differ.

    Raises
    ------
    ValueError
        Fewer than two classes remain after exclusions, or bad shapes / non-finite coordinates.
    """
    x = np.asarray(coords, dtype=np.float64)
    if x.ndim != 2:
        raise InputError(f"coords must be 2-D [N, m], got shape {x.shape}")
    lab = _as_labels(labels, x.shape[0], "labels")
    if not np.isfinite(x).all():
        raise InputError("coords contain NaN or infinite values")
    min_points = max(2, int(min_points))

    keep = ~_missing(lab, exclude)
    x, lab = x[keep], lab[keep]
    if groups is not None:
        grp = _as_labels(groups, keep.shape[0], "groups")[keep]
        x, lab = _group_medians(x, lab, grp)

    codes, classes = pd.factorize(pd.Series(lab, dtype=object), sort=True)
    counts = np.bincount(codes, minlength=len(classes)) if len(classes) else np.zeros(0, int)
    valid = np.flatnonzero(counts >= min_points)
    if len(valid) < 2:
        raise InputError(
            f"the clustering score needs at least 2 classes with >= {min_points} points; "
            f"found {len(valid)} (of {len(classes)} labelled classes)"
        )
    centres = np.empty((len(valid), x.shape[1]))
    sizes = np.empty(len(valid))
    for j, c in enumerate(valid):  # one iteration per class, not per point
        pts = x[codes == c]
        centres[j] = np.median(pts, axis=0)
        sizes[j] = np.median(np.linalg.norm(pts - centres[j], axis=1))
    spread = float(np.median(np.linalg.norm(centres - np.median(centres, axis=0), axis=1)))
    size = float(np.median(sizes))
    if size == 0.0:
        return float("inf") if spread > 0 else float("nan")
    return spread / size


# --------------------------------------------------------------------------------------------------
# k-NN localization classification
# --------------------------------------------------------------------------------------------------


def knn_macro_f1(
    features: np.ndarray,
    labels: Sequence[Hashable] | np.ndarray | pd.Series,
    groups: Sequence[Hashable] | np.ndarray | pd.Series | None = None,
    *,
    k: int = 15,
    metric: str = "cosine",
    exclude_same_group: bool = True,
    weighted: bool = False,
    exclude: Iterable[Hashable] = ("",),
    min_groups_per_class: int = 2,
    block_size: int | None = None,
) -> dict[str, Any]:
    """Leave-group-out k-nearest-neighbour localization classification; macro-F1 and accuracy.

    Every labelled point is classified by a vote of its ``k`` nearest labelled neighbours. With
    ``exclude_same_group`` the neighbours never come from the point's own group (protein): the
    identification pretext task makes crops of one protein cluster together, so without the
    exclusion the score mostly measures protein identity, not localization.

    The search is exact and blockwise in NumPy: for a block of ``B`` queries the ``[B, N]`` distance
    matrix is computed with one matrix product, the query's own group is masked out (points are
    sorted by group, so that is one slice per group) and the ``k`` smallest are taken with
    ``argpartition``. Memory is ``O(B * N)`` on top of the features (``block_size`` defaults to
    ``2**25 / N`` rows, about 128 MiB per block in float32) plus one float32 copy of the labelled
    rows of the features (N = 20,000 x D = 9,216: 0.7 GiB); time is ``O(N^2 D)``: about 2 minutes
    on 2 CPU cores for that size.

    Parameters
    ----------
    features
        ``[N, D]`` features.
    labels
        Class of every point; points whose label is missing or in ``exclude`` are neither queried
        nor used as neighbours.
    groups
        Group (protein id) of every point; ``None``: every point is its own group (only the point
        itself is excluded).
    k
        Number of neighbours (fewer when fewer eligible neighbours exist).
    metric
        ``"cosine"`` or ``"euclidean"``.
    exclude_same_group
        Exclude neighbours from the query's group (always excludes the query itself).
    weighted
        Weight votes by ``1 / (distance + 1e-12)`` instead of one vote each. Ties in the vote go to
        the class whose first neighbour is nearest.
    exclude
        Labels meaning "unlabelled".
    min_groups_per_class
        Classes represented by fewer distinct groups are dropped (with leave-group-out a class with
        a single protein can never be predicted).
    block_size
        Queries per block (see above).

    Returns
    -------
    dict
        ``macro_f1`` (sklearn ``f1_score(average="macro")`` over the evaluated classes),
        ``accuracy``, ``balanced_accuracy``, ``per_class_f1`` and ``support`` (class -> value),
        ``n`` (points evaluated), ``n_unpredicted`` (points with no eligible neighbour, counted as
        wrong), ``n_classes``, ``classes`` and the parameters. All values are plain Python types.
    """
    from sklearn.metrics import balanced_accuracy_score, f1_score

    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    x = np.asarray(features)
    if x.ndim != 2:
        raise InputError(f"features must be 2-D [N, D], got shape {x.shape}")
    n_all = x.shape[0]
    lab = _as_labels(labels, n_all, "labels")
    grp = np.arange(n_all, dtype=object) if groups is None else _as_labels(groups, n_all, "groups")

    keep = ~_missing(lab, exclude)
    if groups is not None:
        keep &= ~_missing(grp, ())
    rows = np.flatnonzero(keep)  # rows of `features` still in play; features are copied once, at the end
    lab, grp = lab[rows], grp[rows]

    # Drop classes with too few groups.
    per_class = pd.DataFrame({"l": lab, "g": grp}).groupby("l", sort=True)["g"].nunique()
    good = per_class.index[per_class >= max(1, min_groups_per_class)]
    sel = pd.Series(lab, dtype=object).isin(good).to_numpy()
    rows, lab, grp = rows[sel], lab[sel], grp[sel]
    y, classes = pd.factorize(pd.Series(lab, dtype=object), sort=True)
    n_cls = len(classes)
    if n_cls < 2:
        raise InputError(
            f"k-NN evaluation needs at least 2 classes with >= {min_groups_per_class} groups; found {n_cls}"
        )

    # Sort by group so that each group's reference columns are one contiguous slice.
    g_codes, _ = pd.factorize(pd.Series(grp, dtype=object), sort=False)
    order = np.argsort(g_codes, kind="stable")
    rows, y, g_codes = rows[order], y[order], g_codes[order]
    n = len(rows)
    g_start = np.searchsorted(g_codes, np.arange(g_codes.max() + 1), side="left")
    g_stop = np.searchsorted(g_codes, np.arange(g_codes.max() + 1), side="right")

    # float32 matmuls for wide features (speed); float64 for narrow ones (UMAP coordinates), where
    # the ||a||^2 + ||b||^2 - 2ab expansion would otherwise lose the small distances.
    dtype = np.float32 if x.shape[1] > 64 else np.float64
    x = x[rows].astype(dtype, copy=False)
    if not np.isfinite(x).all():
        raise InputError("features contain NaN or infinite values")
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x /= np.where(norms > 0, norms, 1)
    else:
        sq = np.einsum("ij,ij->i", x, x)

    bs = block_size or max(1, _KNN_BLOCK_ELEMENTS // max(n, 1))
    kk = min(k, n - 1)
    pred = np.full(n, -1, dtype=np.int64)
    for start in range(0, n, bs):
        stop = min(start + bs, n)
        rows = np.arange(start, stop)
        sim = x[start:stop] @ x.T
        if metric == "cosine":
            d = np.subtract(1.0, sim, out=sim)
        else:
            d = sim
            d *= -2.0
            d += sq[start:stop, None]
            d += sq[None, :]
            np.maximum(d, 0.0, out=d)
        d[rows - start, rows] = np.inf
        if exclude_same_group and groups is not None:
            for g in np.unique(g_codes[start:stop]):
                r0 = max(g_start[g], start) - start
                r1 = min(g_stop[g], stop) - start
                d[r0:r1, g_start[g] : g_stop[g]] = np.inf
        if kk < 1:
            continue
        nb = np.argpartition(d, kk - 1, axis=1)[:, :kk]
        nd = np.take_along_axis(d, nb, axis=1)
        o = np.argsort(nd, axis=1, kind="stable")
        nb = np.take_along_axis(nb, o, axis=1)
        nd = np.take_along_axis(nd, o, axis=1)
        ok = np.isfinite(nd)  # inf = masked (own group / self); sorted last
        b = stop - start
        w = np.where(ok, 1.0 / (nd + 1e-12) if weighted else 1.0, 0.0)
        cls = y[nb]
        flat = (np.arange(b)[:, None] * n_cls + cls).reshape(-1)
        votes = np.bincount(flat, weights=w.reshape(-1), minlength=b * n_cls).reshape(b, n_cls)
        # Tie-break: among the classes with the top vote, the one whose first neighbour is nearest.
        # Writing ranks from the farthest to the nearest leaves each class's first rank in place.
        first = np.full((b, n_cls), np.inf)
        r = np.arange(b)
        for j in range(kk - 1, -1, -1):
            first[r[ok[:, j]], cls[ok[:, j], j]] = j
        top = votes.max(axis=1, keepdims=True)
        p = np.argmin(np.where(votes >= top * (1 - 1e-9), first, np.inf), axis=1)
        p[~ok[:, 0]] = -1
        pred[start:stop] = p

    labels_idx = np.arange(n_cls)
    # Unpredicted points (no eligible neighbour) count as wrong: map them to a dummy label.
    y_pred = np.where(pred >= 0, pred, n_cls)
    per = f1_score(y, y_pred, labels=labels_idx, average=None, zero_division=0)
    support = np.bincount(y, minlength=n_cls)
    return {
        "macro_f1": float(np.mean(per)),
        "accuracy": float(np.mean(y_pred == y)),
        "balanced_accuracy": float(balanced_accuracy_score(y, y_pred)) if n else float("nan"),
        "per_class_f1": {str(c): float(v) for c, v in zip(classes, per, strict=True)},
        "support": {str(c): int(v) for c, v in zip(classes, support, strict=True)},
        "n": int(n),
        "n_unpredicted": int((pred < 0).sum()),
        "n_classes": int(n_cls),
        "classes": [str(c) for c in classes],
        "k": int(k),
        "metric": metric,
        "weighted": bool(weighted),
        "exclude_same_group": bool(exclude_same_group and groups is not None),
    }


# --------------------------------------------------------------------------------------------------
# AnnData entry points
# --------------------------------------------------------------------------------------------------


def protein_level_table(
    adata: AnnData,
    *,
    basis: str = "X_umap",
    groupby: str = "protein_id",
    label_key: str = "label",
) -> pd.DataFrame:
    """One row per protein: crop and field-of-view counts, label and median atlas position.

    Parameters
    ----------
    adata
        AnnData with ``obsm[basis]`` (crops without finite coordinates, e.g. outside the atlas
        split, are skipped).
    basis
        Coordinates to summarise (``[N, 2]``).
    groupby
        ``obs`` column naming the protein.
    label_key
        ``obs`` column with the localization label (the most frequent value per protein).

    Returns
    -------
    pandas.DataFrame
        Index = protein; columns ``n_crops``, ``n_fovs`` (when ``obs`` has ``fov_id``), ``label``,
        ``x``, ``y`` (median coordinates).
    """
    if basis not in adata.obsm:
        raise InputError(f"{basis!r} not in adata.obsm; run umap_embedding / atlas first")
    for col in (groupby, label_key):
        if col not in adata.obs:
            raise InputError(f"column {col!r} not in adata.obs")
    xy = np.asarray(adata.obsm[basis], dtype=np.float64)[:, :2]
    ok = np.isfinite(xy).all(axis=1)
    df = pd.DataFrame(
        {
            "protein": adata.obs[groupby].astype(str).to_numpy()[ok],
            "label": adata.obs[label_key].astype(str).to_numpy()[ok],
            "x": xy[ok, 0],
            "y": xy[ok, 1],
        }
    )
    if "fov_id" in adata.obs:
        df["fov"] = adata.obs["fov_id"].astype(str).to_numpy()[ok]
    g = df.groupby("protein", sort=True)
    out = pd.DataFrame({"n_crops": g.size()})
    if "fov" in df:
        out["n_fovs"] = g["fov"].nunique()
    out["label"] = g["label"].agg(lambda s: s.value_counts().index[0])
    out["x"] = g["x"].median()
    out["y"] = g["y"].median()
    out.index.name = groupby
    return out


def atlas(
    adata: AnnData,
    *,
    label_key: str = "label",
    group_key: str = "protein_id",
    complexes: Mapping[str, str] | None = None,
    split: str | None = "test",
    use_rep: str = "global",
    unlabeled: Iterable[Hashable] = ("",),
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    random_state: int | None = 0,
    max_points: int | None = None,
    knn_k: int = 15,
    knn_metric: str = "cosine",
    knn: bool = True,
    key_added: str = "atlas",
    basis: str = "X_umap",
) -> dict[str, Any]:
    """Build the localization atlas of one split and score it (paper Fig. 2 and Fig. 6).

    Steps: UMAP of ``obsm[use_rep]`` for the crops of ``split``; clustering scores of the
    localization labels (and of protein complexes when ``complexes`` is given), per crop as in the
    paper and per protein (protein medians); leave-protein-out k-NN macro-F1 on the representation
    itself and, for reference, on the 2-D UMAP coordinates.

    Parameters
    ----------
    adata
        Output of ``protloc embed``: ``obs`` with ``label_key``, ``group_key`` and ``split``;
        ``obsm[use_rep]``.
    label_key
        ``obs`` column of localization labels (``unlabeled`` values mean unknown / mixed).
    group_key
        ``obs`` column of protein ids.
    complexes
        Optional mapping protein id -> complex name (CORUM complexes in the paper); proteins not in
        it are unlabelled for the complex score.
    split
        Value of ``obs["split"]`` to map (the paper maps the test set); ``None`` uses every crop.
    use_rep
        ``obsm`` key of the features.
    unlabeled
        Label values that mean "no label".
    n_neighbors, min_dist, random_state, max_points
        Passed to :func:`umap_embedding`.
    knn_k, knn_metric, knn
        k-NN evaluation on the features (``knn=False`` skips it: it costs ``O(N^2 D)``).
    key_added
        ``adata.uns`` key of the results.
    basis
        ``adata.obsm`` key of the UMAP coordinates; crops outside ``split`` get NaN.

    Returns
    -------
    dict
        ``split``, ``n_crops``, ``n_proteins``, ``use_rep``, ``umap`` (parameters),
        ``clustering_score`` (``localization``, ``localization_by_protein`` and, with complexes,
        ``complex`` and ``complex_by_protein``; NaN where fewer than two classes exist), ``knn``
        (``features`` and ``umap``: see :func:`knn_macro_f1`). Also stored in
        ``adata.uns[key_added]``.
    """
    for col in (label_key, group_key):
        if col not in adata.obs:
            raise InputError(f"column {col!r} not in adata.obs")
    if split is not None:
        if "split" not in adata.obs:
            raise InputError("adata.obs has no 'split' column (pass split=None to use all crops)")
        mask = (adata.obs["split"].astype(str) == split).to_numpy()
        if not mask.any():
            have = sorted(adata.obs["split"].astype(str).unique())
            raise InputError(f"no crops in split {split!r} (splits: {have})")
    else:
        mask = np.ones(adata.n_obs, dtype=bool)
    unlabeled = tuple(unlabeled)

    feats = _features(adata, use_rep)[mask]
    labels = adata.obs[label_key].to_numpy(dtype=object)[mask]
    prot = adata.obs[group_key].astype(str).to_numpy(dtype=object)[mask]

    coords = umap_embedding(
        feats,
        n_neighbors=n_neighbors,
        min_dist=min_dist,
        random_state=random_state,
        max_points=max_points,
    )
    full = np.full((adata.n_obs, 2), np.nan, dtype=np.float32)
    full[mask] = coords
    adata.obsm[basis] = full

    def _score(lab: np.ndarray, by_group: bool) -> float:
        try:
            return clustering_score(coords, lab, exclude=unlabeled, groups=prot if by_group else None)
        except InputError:
            return float("nan")

    scores = {
        "localization": _score(labels, False),
        "localization_by_protein": _score(labels, True),
    }
    if complexes is not None:
        cplx = np.array([complexes.get(p, "") for p in prot], dtype=object)
        scores["complex"] = _score(cplx, False)
        scores["complex_by_protein"] = _score(cplx, True)

    knn_res: dict[str, Any] = {}
    if knn:
        for name, f, m in (("features", feats, knn_metric), ("umap", coords, "euclidean")):
            try:
                knn_res[name] = knn_macro_f1(f, labels, prot, k=knn_k, metric=m, exclude=unlabeled)
            except InputError as e:
                knn_res[name] = {"error": str(e)}

    result: dict[str, Any] = {
        "split": "all" if split is None else split,
        "n_crops": int(mask.sum()),
        "n_proteins": int(len(pd.unique(prot))),
        "use_rep": use_rep,
        "basis": basis,
        "umap": {
            "n_neighbors": int(min(n_neighbors, int(mask.sum()) - 1)),
            "min_dist": float(min_dist),
            "metric": "euclidean",
            "random_state": -1 if random_state is None else int(random_state),
            "max_points": -1 if max_points is None else int(max_points),
        },
        "clustering_score": scores,
        "knn": knn_res,
    }
    adata.uns[key_added] = result
    return result
