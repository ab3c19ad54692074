"""Feature-zeroing figures (cytoself paper Fig. 5): what each code draws, in red."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from protloc.analysis.interpret import ZeroingResult

__all__ = ["plot_feature_zeroing"]


def _grey(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, [0.5, 99.5])
    g = np.clip((img - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(img)
    return np.repeat(g[..., None], 3, axis=-1)


def _red_overlay(base: np.ndarray, diff: np.ndarray, scale: float) -> np.ndarray:
    # positive differences = signal the code contributes; drawn in red over the grey input
    a = np.clip(diff / scale, 0, 1)[..., None] if scale > 0 else np.zeros(diff.shape + (1,))
    red = np.zeros_like(base)
    red[..., 0] = 1.0
    return (1 - a) * base * 0.7 + a * red


def plot_feature_zeroing(
    images: np.ndarray, result: ZeroingResult, *, title: str | None = None, panel_size: float = 1.8
) -> Figure:
    """Grid: one row per crop; input, reconstruction, then each zeroed code's difference in red.

    Parameters
    ----------
    images
        ``[B, S, S]`` input crops (the analysed channel).
    result
        Output of :func:`protloc.analysis.interpret.feature_zeroing` on those crops.
    title
        Figure title.
    panel_size
        Inches per panel.

    Returns
    -------
    matplotlib.figure.Figure
    """
    b = len(images)
    k = len(result.codes)
    ncols = 2 + k
    fig = Figure(figsize=(panel_size * ncols, panel_size * b + 0.4), layout="constrained")
    axes = fig.subplots(max(b, 1), ncols, squeeze=False)
    scale = float(np.percentile(np.abs(result.difference), 99.5)) if result.difference.size else 0.0
    for i in range(b):
        base = _grey(images[i])
        panels = [(base, "input"), (_grey(result.reconstruction[i, 0]), "reconstruction")]
        for j, code in enumerate(result.codes):
            panels.append((_red_overlay(base, result.difference[j, i], scale), f"code {code}"))
        for ax, (img, name) in zip(axes[i], panels, strict=True):
            ax.imshow(img, interpolation="nearest")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
