"""CELL-E prediction figures: the 2D probability density map over the nucleus image, and the residue
probabilities of an image-to-sequence fill.

Paper Fig. 3 / S.3.7: the predicted probability map of a protein drawn as a heatmap over the grey
nucleus image it was conditioned on, with the nucleus outline, so that nuclear vs cytoplasmic
predictions read at a glance.
"""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from protloc.errors import InputError

__all__ = ["plot_prediction", "plot_residue_probabilities"]

MASK_COLOR = "#00e5ff"
THRESHOLD_COLOR = "#7CFC00"


def _image2d(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    arr = arr.reshape(arr.shape[-2:]) if arr.ndim > 2 and int(np.prod(arr.shape[:-2])) == 1 else arr
    if arr.ndim != 2 or arr.size == 0:
        raise InputError(f"{name} must be a 2-D image (or [1, S, S]), got shape {np.shape(x)}")
    if not np.isfinite(arr).all():
        raise InputError(f"{name} contains NaN or Inf")
    return arr


def plot_prediction(
    nucleus,
    probability,
    *,
    threshold=None,
    mask=None,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """The probability map as a heatmap over the grey nucleus image.

    Parameters
    ----------
    nucleus
        ``[S, S]`` (or ``[1, S, S]``) nucleus image, shown in grey (min-max scaled for display).
    probability
        ``[S, S]`` 2D probability density map (non-negative, e.g. ``predict(...)["probability"]``),
        drawn with the ``inferno`` colormap; its opacity grows with the value (0 at 0, 0.8 at the
        maximum), so low-probability regions show the nucleus image underneath. The colour bar is in
        units of the map.
    threshold
        Optional ``[S, S]`` predicted threshold image (> 0.5 = protein); its outline is drawn dashed.
    mask
        Optional ``[S, S]`` nucleus mask (non-zero = nucleus); its outline is drawn solid.
    ax
        Axes to draw into (its figure is returned); default: a new figure.
    title
        Axes title.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    InputError
        If the images are not 2-D, differ in shape, or are not finite.
    """
    nuc = _image2d(nucleus, "nucleus")
    prob = _image2d(probability, "probability")
    extra = {name: _image2d(v, name) for name, v in (("threshold", threshold), ("mask", mask)) if v is not None}
    for name, arr in (("probability", prob), *extra.items()):
        if arr.shape != nuc.shape:
            raise InputError(f"{name} has shape {arr.shape}, the nucleus image {nuc.shape}")
    if ax is None:
        fig = Figure(figsize=(4.6, 4.0), layout="constrained")
        ax = fig.subplots()
    else:
        fig = ax.get_figure()
    lo, hi = float(nuc.min()), float(nuc.max())
    grey = (nuc - lo) / (hi - lo) if hi > lo else np.zeros_like(nuc)
    ax.imshow(grey, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")

    prob = np.clip(prob, 0.0, None)
    vmax = float(prob.max()) or 1.0
    cmap = colormaps["inferno"]
    rgba = cmap(prob / vmax)
    rgba[..., 3] = 0.8 * prob / vmax  # transparent where improbable: the nucleus shows through
    ax.imshow(rgba, interpolation="nearest")
    scale = ScalarMappable(norm=Normalize(vmin=0.0, vmax=vmax), cmap=cmap)
    fig.colorbar(scale, ax=ax, shrink=0.85, label="probability (2D PDF)", format="%.1e")

    handles = []
    for name, color, style, label in (
        ("mask", MASK_COLOR, "solid", "nucleus mask"),
        ("threshold", THRESHOLD_COLOR, "dashed", "predicted threshold"),
    ):
        arr = extra.get(name)
        if arr is None:
            continue
        binary = (arr > 0) if name == "mask" else (arr > 0.5)
        if binary.any() and not binary.all():
            ax.contour(binary.astype(float), levels=[0.5], colors=[color], linewidths=1.2, linestyles=style)
        handles.append(Line2D([], [], color=color, linestyle=style, label=label))
    if handles:
        ax.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.6)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def plot_residue_probabilities(
    probs,
    positions,
    alphabet: str,
    *,
    chosen: str | None = None,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Residue probabilities of filled positions as a heatmap (residues x positions).

    Parameters
    ----------
    probs
        ``[P, A]`` probabilities of the ``A`` residues of ``alphabet`` at ``P`` filled positions (e.g.
        the mean over samples of :func:`protloc.eval.fill.fill_sequences`'s ``probs``).
    positions
        ``P`` 1-based sequence positions, the column labels.
    alphabet
        The ``A`` one-letter residue codes, the row labels.
    chosen
        Optional ``P`` residues that were filled in (one sample), marked with a dot.
    ax
        Axes to draw into; None makes a new figure.
    title
        Axes title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    p = np.asarray(probs, dtype=float)
    pos = [int(x) for x in positions]
    if p.ndim != 2 or p.shape != (len(pos), len(alphabet)):
        raise InputError(f"probs must be [{len(pos)} positions, {len(alphabet)} residues], got {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any():
        raise InputError("residue probabilities must be finite and non-negative")
    if chosen is not None and len(chosen) != len(pos):
        raise InputError(f"chosen has {len(chosen)} residues for {len(pos)} positions")
    if ax is None:
        fig = Figure(figsize=(max(4.0, 0.28 * len(pos) + 2.0), 5.0))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    im = ax.imshow(p.T, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(p.max()), 1e-12), origin="upper")
    ax.set_yticks(range(len(alphabet)), list(alphabet), fontsize=7)
    step = max(1, len(pos) // 30)
    ax.set_xticks(range(0, len(pos), step), [str(x) for x in pos[::step]], fontsize=7, rotation=90)
    ax.set_xlabel("position (1-based)")
    ax.set_ylabel("residue")
    if chosen is not None:
        rows = [alphabet.index(c) if c in alphabet else -1 for c in chosen]
        xs = [i for i, r in enumerate(rows) if r >= 0]
        ax.scatter(xs, [rows[i] for i in xs], s=8, c="white", marker="o", linewidths=0)
    fig.colorbar(im, ax=ax, label="probability", fraction=0.04)
    if title:
        ax.set_title(title)
    return fig
