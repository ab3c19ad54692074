"""Feature spectra: histograms of quantized code indices per protein, biclustered (paper Fig. 4).

cytoself paper, Results "Extracting feature spectra" and Methods "Feature spectrum" (Supp. Fig. 8):

1. for every crop, the histogram of the VQ1 code indices of its 25 x 25 local representation;
   averaged over the crops of each protein -> a proteins x codes matrix (the *spectra*);
2. the Pearson correlation between the code columns ("feature index profiles") -> a K x K matrix;
3. hierarchical biclustering: codes with similar profiles are merged, giving a linear order of the
   codes; the top levels of the feature tree give the 11 feature clusters i..xi;
4. the mean spectrum of each localization family, and the correlation of one (possibly unknown)
   protein's spectrum with every family (Fig. 4e: FAM241A is most correlated with the ER family).

The reference computes step 2 with millions of Python-level calls; here it is one matrix product.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scipy.cluster.hierarchy import fcluster, leaves_list, linkage
from scipy.spatial.distance import squareform

from protloc.errors import InputError

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "SpectrumOrder",
    "bicluster",
    "consensus_spectra",
    "family_correlation",
    "feature_correlation",
    "feature_spectra",
    "roman",
    "spectra_from_indices",
]

_LINKAGE_METHODS = ("single", "complete", "average", "weighted", "centroid", "median", "ward")
# Rows of the index matrix handled per bincount call: bounds the int64 temporaries to ~64 MiB.
_CHUNK_ELEMENTS = 2**23


def roman(i: int) -> str:
    """Lower-case roman numeral of a positive integer (feature clusters are named i..xi)."""
    if i < 1:
        raise ValueError(f"roman numerals start at 1, got {i}")
    out = []
    for value, sym in (
        (1000, "m"),
        (900, "cm"),
        (500, "d"),
        (400, "cd"),
        (100, "c"),
        (90, "xc"),
        (50, "l"),
        (40, "xl"),
        (10, "x"),
        (9, "ix"),
        (5, "v"),
        (4, "iv"),
        (1, "i"),
    ):
        q, i = divmod(i, value)
        out.append(sym * q)
    return "".join(out)


# --------------------------------------------------------------------------------------------------
# spectra
# --------------------------------------------------------------------------------------------------


def spectra_from_indices(
    indices: np.ndarray,
    groups: np.ndarray | pd.Series | list,
    *,
    codebook_size: int | None = None,
    normalize: bool | Literal["frequency", "per_image", "counts"] = "frequency",
    name: str | None = None,
) -> pd.DataFrame:
    """Histogram of code indices per group, from arrays (see :func:`feature_spectra`).

    Parameters
    ----------
    indices
        ``[N, ...]`` integer code indices of N crops (any trailing shape: ``[N, 625]``,
        ``[N, 1, 25, 25]``, ...).
    groups
        Group (protein id) of every crop; crops with a missing group are skipped.
    codebook_size
        Number of codes K (columns); ``None``: ``max(indices) + 1``.
    normalize
        ``"frequency"`` / ``True``: each row sums to 1; ``"per_image"``: mean count per crop
        (the paper's "occurrence", Fig. 4b); ``"counts"`` / ``False``: raw counts.
    name
        Name of the index (rows).

    Returns
    -------
    pandas.DataFrame
        Rows = groups (sorted), columns = code index ``0..K-1``.
    """
    idx = np.asarray(indices)
    if idx.ndim < 1 or idx.shape[0] == 0:
        raise InputError("no crops: indices is empty")
    if not np.issubdtype(idx.dtype, np.integer):
        if not np.all(np.mod(idx, 1) == 0):
            raise InputError("code indices must be integers")
        idx = idx.astype(np.int64)
    idx = idx.reshape(idx.shape[0], -1)
    n = idx.shape[0]
    grp = pd.Series(np.asarray(groups, dtype=object).reshape(-1), dtype=object)
    if len(grp) != n:
        raise InputError(f"{len(grp)} groups for {n} crops")
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0:
        raise InputError(f"negative code index {lo}")
    k = hi + 1 if codebook_size is None else int(codebook_size)
    if hi >= k:
        raise InputError(f"code index {hi} out of range for codebook_size {k}")
    mode = {True: "frequency", False: "counts"}.get(normalize, normalize)  # type: ignore[arg-type]
    if mode not in ("frequency", "per_image", "counts"):
        raise ValueError(f"normalize must be 'frequency', 'per_image', 'counts' or a bool, got {normalize!r}")

    codes, uniq = pd.factorize(grp, sort=True)
    ok = codes >= 0
    if not ok.any():
        raise InputError("every crop has a missing group")
    codes, idx = codes[ok], idx[ok]
    g = len(uniq)
    counts = np.zeros(g * k, dtype=np.int64)
    rows = max(1, _CHUNK_ELEMENTS // idx.shape[1])
    for s in range(0, idx.shape[0], rows):  # one bincount over (group * K + code) per chunk
        flat = (codes[s : s + rows, None].astype(np.int64) * k + idx[s : s + rows]).reshape(-1)
        counts += np.bincount(flat, minlength=g * k)
    counts = counts.reshape(g, k)

    if mode == "counts":
        values: np.ndarray = counts
    elif mode == "frequency":
        values = counts / counts.sum(axis=1, keepdims=True)
    else:
        values = counts / np.bincount(codes, minlength=g)[:, None]
    return pd.DataFrame(values, index=pd.Index(uniq, name=name), columns=pd.RangeIndex(k, name="code"))


def feature_spectra(
    adata: AnnData,
    *,
    key: str = "local_indices",
    groupby: str = "protein_id",
    codebook_size: int | None = None,
    normalize: bool | Literal["frequency", "per_image", "counts"] = "frequency",
) -> pd.DataFrame:
    """Feature spectrum of every protein: the histogram of its crops' code indices (Supp. Fig. 8).

    Parameters
    ----------
    adata
        Output of ``protloc embed`` with ``obsm[key]`` (``[N, 625]`` VQ1 or ``[N, 144]`` VQ2 indices).
    key
        ``obsm`` key of the code indices.
    groupby
        ``obs`` column to aggregate over (protein id; any categorical column works).
    codebook_size
        Number of codes K; ``None``: ``uns["cytoself"]["codebook_size1"]`` for ``local_indices``,
        ``codebook_size2`` for ``global_indices``, else ``max + 1``.
    normalize
        ``"frequency"`` / ``True`` (rows sum to 1), ``"per_image"`` (mean count per crop, the
        paper's "occurrence") or ``"counts"`` / ``False``.

    Returns
    -------
    pandas.DataFrame
        Rows = ``groupby`` values (sorted), columns = code index ``0..K-1``.
    """
    if key not in adata.obsm:
        raise InputError(f"{key!r} not in adata.obsm (have: {sorted(adata.obsm)})")
    if groupby not in adata.obs:
        raise InputError(f"column {groupby!r} not in adata.obs")
    if codebook_size is None:
        meta = adata.uns.get("cytoself", {})
        size_key = {"local_indices": "codebook_size1", "global_indices": "codebook_size2"}.get(key)
        if size_key is not None and size_key in meta:
            codebook_size = int(meta[size_key])
    groups = adata.obs[groupby].to_numpy(dtype=object)
    return spectra_from_indices(
        np.asarray(adata.obsm[key]), groups, codebook_size=codebook_size, normalize=normalize, name=groupby
    )


# --------------------------------------------------------------------------------------------------
# correlation and biclustering
# --------------------------------------------------------------------------------------------------


def _column_correlation(x: np.ndarray) -> np.ndarray:
    """Pearson correlation of the columns of ``x``; constant columns correlate 0 (diagonal too)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise InputError(f"expected a 2-D matrix, got shape {x.shape}")
    xc = x - x.mean(axis=0)
    norm = np.sqrt(np.einsum("ij,ij->j", xc, xc))
    # A column is constant when its centred norm is at rounding level relative to its values.
    scale = np.abs(x).max(axis=0) * np.sqrt(max(x.shape[0], 1))
    const = norm <= 1e-12 * np.maximum(scale, np.finfo(np.float64).tiny)
    xc /= np.where(const, 1.0, norm)
    xc[:, const] = 0.0
    r = xc.T @ xc
    np.clip(r, -1.0, 1.0, out=r)
    diag = np.where(const, 0.0, 1.0)
    np.fill_diagonal(r, diag)
    return r


def feature_correlation(spectra: pd.DataFrame | np.ndarray) -> np.ndarray:
    """Pearson correlation between the code columns of the spectra (Supp. Fig. 8c).

    Vectorised: centre every column, divide by its norm, one ``[K, P] @ [P, K]`` product.
    Constant columns (unused codes, or codes used equally by every protein) have no defined
    correlation: their row and column are 0 (diagonal included), without NaN or warnings.

    Parameters
    ----------
    spectra
        ``[P, K]`` proteins x codes.

    Returns
    -------
    numpy.ndarray
        ``[K, K]`` float64, symmetric, in [-1, 1].
    """
    return _column_correlation(np.asarray(spectra))


@dataclass(frozen=True)
class SpectrumOrder:
    """Result of :func:`bicluster`: how to order the codes and proteins of a spectra matrix.

    Attributes
    ----------
    feature_order
        ``[K]`` code indices in display order: the leaves of the feature dendrogram, then the
        unused codes (all-zero columns) in ascending order.
    protein_order
        ``[P]`` row positions in display order (leaves of the protein dendrogram).
    proteins
        Row labels in display order.
    feature_clusters
        ``[K]`` cluster number of every code (indexed by code, not by position): 1..n, numbered
        in display order (cluster 1 = "i" is leftmost); -1 for unused codes.
    n_clusters
        Number of clusters found (``fcluster`` may give fewer than asked for).
    feature_linkage, protein_linkage
        SciPy linkage matrices (of the used codes, in the order of ``used_features``; of the rows),
        ``None`` when there were fewer than two items.
    used_features
        Code indices that were clustered (the non-zero columns), in column order.
    """

    feature_order: np.ndarray
    protein_order: np.ndarray
    proteins: pd.Index
    feature_clusters: np.ndarray
    n_clusters: int
    feature_linkage: np.ndarray | None = field(repr=False)
    protein_linkage: np.ndarray | None = field(repr=False)
    used_features: np.ndarray = field(repr=False)

    @property
    def cluster_names(self) -> dict[int, str]:
        """Cluster number -> roman numeral (-1 -> ``"unused"``)."""
        names = {c: roman(c) for c in range(1, self.n_clusters + 1)}
        if (self.feature_clusters < 0).any():
            names[-1] = "unused"
        return names

    def ordered_clusters(self) -> np.ndarray:
        """Cluster number of every display position (``feature_clusters[feature_order]``)."""
        return self.feature_clusters[self.feature_order]

    def cluster_spans(self, *, include_unused: bool = False) -> list[tuple[int, int, int]]:
        """Contiguous ``(cluster, start, stop)`` runs of display positions, left to right."""
        c = self.ordered_clusters()
        if len(c) == 0:
            return []
        cuts = np.flatnonzero(np.diff(c)) + 1
        starts = np.r_[0, cuts]
        stops = np.r_[cuts, len(c)]
        return [(int(c[a]), int(a), int(b)) for a, b in zip(starts, stops, strict=True) if include_unused or c[a] >= 0]

    def apply(self, spectra: pd.DataFrame, *, include_unused: bool = True) -> pd.DataFrame:
        """Reorder the rows and columns of ``spectra`` (the one this order was computed on)."""
        cols = (
            self.feature_order if include_unused else self.feature_order[self.feature_clusters[self.feature_order] >= 0]
        )
        return spectra.iloc[self.protein_order, cols]


def _linkage_order(x: np.ndarray, method: str, optimal_ordering: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Leaf order and linkage of the columns of ``x`` on correlation distance ``1 - r``."""
    m = x.shape[1]
    if m < 2:
        return np.arange(m), None
    dist = 1.0 - _column_correlation(x)
    np.fill_diagonal(dist, 0.0)
    np.maximum(dist, 0.0, out=dist)
    dist = (dist + dist.T) / 2.0  # exact symmetry for squareform
    z = linkage(squareform(dist, checks=False), method=method, optimal_ordering=optimal_ordering)
    return leaves_list(z), z


def bicluster(
    spectra: pd.DataFrame,
    *,
    method: str = "average",
    n_clusters: int = 11,
    optimal_ordering: bool = False,
) -> SpectrumOrder:
    """Hierarchical biclustering of a spectra matrix (paper Fig. 4a, Supp. Fig. 8d).

    Codes are clustered on the correlation distance ``1 - r`` between their profiles across
    proteins (:func:`feature_correlation`), proteins on ``1 - r`` between their spectra. The
    feature tree is cut into at most ``n_clusters`` flat clusters (``fcluster(maxclust=...)``; the
    paper cut the top levels into 11 clusters i..xi by eye), numbered in display order. Codes never
    used by any protein are left out of the clustering and put at the end with cluster -1.

    Parameters
    ----------
    spectra
        ``[P, K]`` proteins x codes (output of :func:`feature_spectra`).
    method
        SciPy linkage method; ``"average"`` (UPGMA) by default. Centroid, median and ward assume
        Euclidean distances and are only approximations on correlation distances.
    n_clusters
        Maximum number of feature clusters.
    optimal_ordering
        SciPy's optimal leaf ordering (nicer heatmaps; noticeably slower for K = 2048).

    Returns
    -------
    SpectrumOrder
    """
    if method not in _LINKAGE_METHODS:
        raise ValueError(f"method must be one of {_LINKAGE_METHODS}, got {method!r}")
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    x = np.asarray(spectra, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(f"spectra must be a non-empty [proteins, codes] matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise InputError("spectra contain NaN or infinite values")
    index = spectra.index if isinstance(spectra, pd.DataFrame) else pd.RangeIndex(x.shape[0])

    used = np.flatnonzero((x != 0).any(axis=0))
    unused = np.setdiff1d(np.arange(x.shape[1]), used)
    leaves, fz = _linkage_order(x[:, used], method, optimal_ordering)
    clusters = np.full(x.shape[1], -1, dtype=np.int64)
    if len(used) >= 2:
        flat = fcluster(fz, t=n_clusters, criterion="maxclust")
    else:
        flat = np.ones(len(used), dtype=np.int64)
    # Renumber 1..n in display (leaf) order.
    _, first = np.unique(flat[leaves], return_index=True)
    seen = flat[leaves][np.sort(first)]
    remap = {int(old): new for new, old in enumerate(seen, start=1)}
    clusters[used] = [remap[int(c)] for c in flat]
    feature_order = np.concatenate([used[leaves], unused]).astype(np.int64)

    prow, pz = _linkage_order(x[:, used].T if len(used) else x.T, method, optimal_ordering)
    return SpectrumOrder(
        feature_order=feature_order,
        protein_order=np.asarray(prow, dtype=np.int64),
        proteins=index[prow],
        feature_clusters=clusters,
        n_clusters=len(seen),
        feature_linkage=fz,
        protein_linkage=pz,
        used_features=used,
    )


# --------------------------------------------------------------------------------------------------
# localization families
# --------------------------------------------------------------------------------------------------


def _label_series(labels: Mapping[Hashable, Hashable] | pd.Series) -> pd.Series:
    s = labels.copy() if isinstance(labels, pd.Series) else pd.Series(dict(labels), dtype=object)
    return s


def consensus_spectra(
    spectra: pd.DataFrame,
    labels: Mapping[Hashable, Hashable] | pd.Series,
    *,
    exclude: tuple[Hashable, ...] = ("",),
) -> pd.DataFrame:
    """Mean spectrum of every localization family (paper Fig. 4b).

    Parameters
    ----------
    spectra
        ``[P, K]`` proteins x codes.
    labels
        Protein -> family (localization category). Proteins missing from ``labels``, with a
        missing label or a label in ``exclude`` are left out.
    exclude
        Labels meaning "no family".

    Returns
    -------
    pandas.DataFrame
        Rows = families (sorted), columns = codes. ``attrs["members"]`` maps every family to its
        proteins, which :func:`family_correlation` uses to leave a query out of its own family.
    """
    lab = _label_series(labels).reindex(spectra.index)
    keep = lab.notna() & ~lab.isin(list(exclude))
    if not keep.any():
        raise InputError("no protein of the spectra has a family label")
    sub = spectra.loc[keep.to_numpy()]
    fam = lab[keep]
    out = sub.groupby(fam.to_numpy(), sort=True).mean()
    out.index.name = "family"
    out.attrs["members"] = {f: list(sub.index[(fam == f).to_numpy()]) for f in out.index}
    return out


def _pearson_rows(q: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Pearson r of vector ``q`` with every row of ``m`` (0 where either is constant)."""
    qc = q - q.mean()
    mc = m - m.mean(axis=1, keepdims=True)
    qn = np.linalg.norm(qc)
    mn = np.linalg.norm(mc, axis=1)
    den = qn * mn
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, (mc @ qc) / np.where(den > 0, den, 1.0), 0.0)
    return np.clip(r, -1.0, 1.0)


def family_correlation(
    query: Hashable | np.ndarray | pd.Series,
    consensus: pd.DataFrame,
    *,
    spectra: pd.DataFrame | None = None,
    labels: Mapping[Hashable, Hashable] | pd.Series | None = None,
) -> pd.Series:
    """Pearson r of one protein's spectrum with every family's consensus (paper Fig. 4e).

    When the query is a protein that belongs to a family, that family's consensus is recomputed
    without it (leave-one-out), so a protein is not compared with an average that contains itself;
    a family whose only member is the query is dropped.

    Parameters
    ----------
    query
        A protein id (looked up in ``spectra``) or a spectrum (``[K]`` array / Series), e.g. of a
        protein of unknown localization.
    consensus
        Output of :func:`consensus_spectra`.
    spectra
        The spectra matrix; needed when ``query`` is a protein id.
    labels
        Protein -> family; only needed when ``consensus.attrs["members"]`` was lost (e.g. after
        copying the frame through an operation that drops ``attrs``).

    Returns
    -------
    pandas.Series
        Family -> r, sorted descending; ``name`` is the query's id (or ``"query"``).
    """
    members: dict[Hashable, list[Hashable]] = dict(consensus.attrs.get("members", {}))
    if labels is not None:
        lab = _label_series(labels)
        members = {f: list(lab.index[(lab == f).to_numpy()]) for f in consensus.index}
        if spectra is not None:
            members = {f: [p for p in ps if p in spectra.index] for f, ps in members.items()}

    is_vector = isinstance(query, np.ndarray | pd.Series | list)
    if is_vector:
        q = np.asarray(query, dtype=np.float64).reshape(-1)
        name: Hashable = query.name if isinstance(query, pd.Series) and query.name is not None else "query"
        own: list[Hashable] = []
    else:
        if spectra is None:
            raise InputError("pass spectra= to look up a protein id")
        if query not in spectra.index:
            raise InputError(f"protein {query!r} not in the spectra")
        q = spectra.loc[query].to_numpy(dtype=np.float64)
        name = query
        own = [f for f, ps in members.items() if query in ps]
    if q.shape[0] != consensus.shape[1]:
        raise InputError(f"query spectrum has {q.shape[0]} codes, the consensus {consensus.shape[1]}")

    m = consensus.to_numpy(dtype=np.float64).copy()
    keep = np.ones(len(consensus), dtype=bool)
    for f in own:  # leave the query out of its own family's mean
        i = consensus.index.get_loc(f)
        n = len(members[f])
        if n <= 1:
            keep[i] = False
        else:
            m[i] = (m[i] * n - q) / (n - 1)
    r = _pearson_rows(q, m[keep])
    out = pd.Series(r, index=consensus.index[keep], name=name).sort_values(ascending=False, kind="stable")
    out.index.name = "family"
    return out
