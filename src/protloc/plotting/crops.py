"""Crops drawn the way microscopists look at them: nucleus in grey, protein in green."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

__all__ = ["composite", "crop_grid"]


def _unit(image: np.ndarray, pct: float) -> np.ndarray:
    img = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(img, [0.0, pct])
    if hi <= lo:
        return np.zeros_like(img)
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0)


def composite(nucleus: np.ndarray, protein: np.ndarray, *, saturation: float = 99.5) -> np.ndarray:
    """Return an RGB image: nucleus in grey, protein in green, each contrast-stretched.

    Parameters
    ----------
    nucleus, protein
        2-D images of the same shape (any intensity scale).
    saturation
        Percentile mapped to full brightness (robust to a few hot pixels).

    Returns
    -------
    numpy.ndarray
        ``(Y, X, 3)`` float32 in [0, 1].
    """
    nucleus = np.asarray(nucleus)
    protein = np.asarray(protein)
    if nucleus.shape != protein.shape or nucleus.ndim != 2:
        raise ValueError(f"nucleus {nucleus.shape} and protein {protein.shape} must be 2-D images of one shape")
    n = 0.6 * _unit(nucleus, saturation)
    p = _unit(protein, saturation)
    rgb = np.stack([n, np.maximum(n, p), n], axis=-1)
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)


def crop_grid(
    crops: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    titles: Sequence[str] | None = None,
    ncols: int = 4,
    panel_size: float = 2.0,
) -> Figure:
    """Draw (nucleus, protein) crops as a grid of grey/green composites.

    Parameters
    ----------
    crops
        Sequence of ``(nucleus, protein)`` 2-D image pairs.
    titles
        One title per crop.
    ncols
        Panels per row.
    panel_size
        Inches per panel.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if titles is not None and len(titles) != len(crops):
        raise ValueError(f"{len(titles)} titles for {len(crops)} crops")
    n = len(crops)
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    fig = Figure(figsize=(panel_size * ncols, panel_size * nrows + 0.3), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= n:
            continue
        nuc, prot = crops[i]
        ax.imshow(composite(nuc, prot), interpolation="nearest")
        if titles is not None:
            ax.set_title(titles[i].replace("_", " "), fontsize=9)
    return fig
