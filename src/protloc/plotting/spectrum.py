"""Feature-spectrum figures (paper Fig. 4): the biclustered heatmap, one protein's spectrum, and
the correlation of a protein with every localization family."""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from protloc.analysis.spectrum import SpectrumOrder, feature_correlation, roman
from protloc.errors import InputError

__all__ = ["plot_correlation_heatmap", "plot_family_correlation", "plot_feature_spectrum", "plot_spectrum_heatmap"]

_BAND_COLORS = ("#f2f2f2", "#dde6f0")


def _new_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax  # type: ignore[return-value]
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _cluster_bar(ax: Axes, order: SpectrumOrder, n_positions: int, *, where: str = "top") -> Axes:
    """A thin strip above (or below) ``ax`` with one band and roman numeral per feature cluster."""
    bounds = [0, 1.01, 1, 0.05] if where == "top" else [0, -0.08, 1, 0.05]
    bar = ax.inset_axes(bounds, sharex=ax)
    spans = order.cluster_spans(include_unused=True)
    for c, a, b in spans:
        if a >= n_positions:
            break
        if c < 0:  # unused codes: no band
            continue
        b = min(b, n_positions)
        bar.axvspan(a - 0.5, b - 0.5, color=f"C{(c - 1) % 10}", alpha=0.8, linewidth=0)
        bar.text((a + b - 1) / 2, 0.5, roman(c), ha="center", va="center", fontsize="x-small")
    bar.set_yticks([])
    bar.tick_params(axis="x", labelbottom=False, bottom=False)
    for s in bar.spines.values():
        s.set_visible(False)
    return bar


def plot_spectrum_heatmap(
    spectra: pd.DataFrame,
    order: SpectrumOrder,
    *,
    ax: Axes | None = None,
    max_proteins: int = 2000,
    scale: str = "row",
    cmap: str = "magma_r",
    show_unused: bool = False,
) -> Figure:
    """Proteins x features heatmap in biclustered order, feature clusters i..xi on top (Fig. 4a).

    Parameters
    ----------
    spectra
        ``[P, K]`` spectra (the matrix ``order`` was computed on).
    order
        Output of :func:`protloc.analysis.spectrum.bicluster`.
    ax
        Axes to draw into; ``None`` makes a new figure.
    max_proteins
        With more proteins, every ``ceil(P / max_proteins)``-th row (in biclustered order) is drawn.
    scale
        ``"row"``: each protein divided by its maximum (spectra differ a lot in peak height);
        ``"log"``: ``log10`` of the values (zeros at the floor); ``"none"``: raw values.
    cmap
        Colormap.
    show_unused
        Also draw the never-used codes at the right end.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if scale not in ("row", "log", "none"):
        raise ValueError(f"scale must be 'row', 'log' or 'none', got {scale!r}")
    mat = order.apply(spectra, include_unused=show_unused).to_numpy(dtype=np.float64)
    step = max(1, int(np.ceil(mat.shape[0] / max(1, max_proteins))))
    mat = mat[::step]
    if scale == "row":
        mx = mat.max(axis=1, keepdims=True)
        mat = mat / np.where(mx > 0, mx, 1.0)
        label = "fraction of the protein's peak"
    elif scale == "log":
        pos = mat[mat > 0]
        floor = pos.min() if pos.size else 1.0
        mat = np.log10(np.maximum(mat, floor))
        label = "log10 value"
    else:
        label = "value"
    fig, ax = _new_axes(ax, (10.0, 6.0))
    im = ax.imshow(mat, aspect="auto", interpolation="nearest", cmap=cmap)
    ax.set_xlabel("feature (biclustered order)")
    ax.set_ylabel(f"protein ({mat.shape[0]} of {spectra.shape[0]})" if step > 1 else "protein")
    ax.set_yticks([])
    _cluster_bar(ax, order, mat.shape[1])
    fig.colorbar(im, ax=ax, label=label, shrink=0.8)
    return fig


def plot_correlation_heatmap(
    spectra: pd.DataFrame,
    order: SpectrumOrder,
    *,
    ax: Axes | None = None,
    cmap: str = "RdBu_r",
) -> Figure:
    """Feature x feature Pearson correlation in biclustered order, clusters on top (Supp. Fig. 8d).

    Parameters
    ----------
    spectra
        ``[P, K]`` spectra.
    order
        Output of :func:`protloc.analysis.spectrum.bicluster`; unused codes are not drawn.
    ax
        Axes to draw into; ``None`` makes a new figure.
    cmap
        Diverging colormap (anti-correlation is negative).

    Returns
    -------
    matplotlib.figure.Figure
    """
    cols = order.feature_order[order.feature_clusters[order.feature_order] >= 0]
    r = feature_correlation(spectra.to_numpy()[:, cols])
    fig, ax = _new_axes(ax, (7.5, 7.0))
    im = ax.imshow(r, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xlabel("feature (biclustered order)")
    ax.set_ylabel("feature (biclustered order)")
    _cluster_bar(ax, order, len(cols))
    fig.colorbar(im, ax=ax, label="Pearson r", shrink=0.8)
    return fig


def plot_feature_spectrum(
    spectra: pd.DataFrame,
    protein: Hashable | np.ndarray | pd.Series,
    order: SpectrumOrder,
    *,
    ax: Axes | None = None,
    show_unused: bool = False,
    color: str = "k",
    title: str | None = None,
) -> Figure:
    """One protein's feature spectrum in the biclustered order, feature clusters shaded (Fig. 4b-c).

    Parameters
    ----------
    spectra
        ``[P, K]`` spectra (gives the code count and, for an id, the protein's row).
    protein
        A protein id of ``spectra`` or a ``[K]`` spectrum (e.g. of an unknown protein).
    order
        Output of :func:`protloc.analysis.spectrum.bicluster`.
    ax
        Axes to draw into; ``None`` makes a new figure.
    show_unused
        Also draw the never-used codes at the right end.
    color
        Line colour.
    title
        Axes title (default: the protein id).

    Returns
    -------
    matplotlib.figure.Figure
    """
    if isinstance(protein, np.ndarray | pd.Series | list):
        values = np.asarray(protein, dtype=np.float64).reshape(-1)
        name = protein.name if isinstance(protein, pd.Series) else None
    else:
        if protein not in spectra.index:
            raise InputError(f"protein {protein!r} not in the spectra")
        values = spectra.loc[protein].to_numpy(dtype=np.float64)
        name = protein
    if values.shape[0] != spectra.shape[1]:
        raise InputError(f"spectrum has {values.shape[0]} codes, the spectra {spectra.shape[1]}")
    cols = order.feature_order if show_unused else order.feature_order[order.feature_clusters[order.feature_order] >= 0]
    v = values[cols]
    fig, ax = _new_axes(ax, (10.0, 2.8))
    top = float(v.max()) if v.size and v.max() > 0 else 1.0
    for j, (c, a, b) in enumerate(order.cluster_spans(include_unused=show_unused)):
        ax.axvspan(a - 0.5, b - 0.5, color=_BAND_COLORS[j % 2], linewidth=0, zorder=0)
        if c > 0:
            ax.text((a + b - 1) / 2, 1.02 * top, roman(c), ha="center", va="bottom", fontsize="small")
    ax.plot(np.arange(len(v)), v, color=color, linewidth=0.8, zorder=2)
    ax.set_xlim(-0.5, len(v) - 0.5)
    ax.set_ylim(0, 1.12 * top)
    ax.set_xlabel("feature (biclustered order)")
    ax.set_ylabel("occurrence")
    if title is not None or name is not None:
        ax.set_title(str(title if title is not None else name))
    return fig


def plot_family_correlation(
    series: pd.Series,
    *,
    ax: Axes | None = None,
    highlight: Hashable | None = None,
    title: str | None = None,
) -> Figure:
    """Horizontal bars of a protein's correlation with every localization family (Fig. 4e).

    Parameters
    ----------
    series
        Output of :func:`protloc.analysis.spectrum.family_correlation` (family -> r).
    ax
        Axes to draw into; ``None`` makes a new figure.
    highlight
        Family drawn in a different colour (default, or when it is not in ``series``: the best one).
    title
        Axes title (default: the series name).

    Returns
    -------
    matplotlib.figure.Figure
    """
    s = series.sort_values(ascending=True)
    fig, ax = _new_axes(ax, (5.0, 0.3 * len(s) + 1.2))
    # Highlight the given family (e.g. the protein's annotated one), else the best-correlated one.
    best = highlight if highlight is not None and highlight in s.index else (s.index[-1] if len(s) else None)
    colors = ["C3" if f == best else "C0" for f in s.index]
    ax.barh(np.arange(len(s)), s.to_numpy(), color=colors)
    ax.set_yticks(np.arange(len(s)), [str(f) for f in s.index])
    ax.axvline(0, color="k", linewidth=0.8)
    ax.set_xlabel("Pearson r with family consensus")
    if title is not None or series.name is not None:
        ax.set_title(str(title if title is not None else series.name))
    return fig
