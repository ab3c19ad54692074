"""Figures of ``protloc localize``: which residues drive the protein encoder's prediction.

- :func:`plot_importance`: a signed per-residue importance track (integrated gradients,
  :func:`protloc.eval.localize.residue_importance`) along the sequence, with the peak window
  (:func:`protloc.eval.localize.peak_window`) shaded and labelled with its residues.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from protloc.errors import InputError

__all__ = ["plot_importance"]

#: Sequences up to this length get their residue letters on the x axis.
_LETTERS_UP_TO = 80
#: Sequences up to this length are drawn as one bar per residue (longer ones as filled areas).
_BARS_UP_TO = 400


def plot_importance(
    sequence: str,
    track: Sequence[float] | np.ndarray,
    *,
    title: str | None = None,
    peak: tuple[int, int] | tuple[int, int, float] | None = None,
    ylabel: str = "importance (integrated gradients)",
    ax: Axes | None = None,
) -> Figure:
    """Signed importance of each residue, as bars along the sequence.

    Parameters
    ----------
    sequence
        The protein (its length must be the track's).
    track
        One score per residue (index ``i`` is residue ``i + 1``); positive pushes the explained output up
        (drawn red), negative down (blue). NaN (a clipped middle the model never saw) is left blank and
        shaded grey.
    title
        Axes title.
    peak
        ``(start, end[, score])``, 1-based inclusive (a :class:`~protloc.eval.localize.Peak`): shaded and
        labelled with its positions and residues.
    ylabel
        y-axis label.
    ax
        Axes to draw on; default a new figure.

    Returns
    -------
    matplotlib.figure.Figure
        Residue position on x (residue letters as tick labels for sequences of at most 80 residues).

    Raises
    ------
    InputError
        A track whose length is not the sequence's, or a peak outside the sequence.
    """
    seq = "".join(str(sequence).split()).upper()
    values = np.asarray(track, dtype=np.float64).ravel()
    n = len(seq)
    if n == 0 or values.size != n:
        raise InputError(f"the importance track has {values.size} values for a sequence of {n} residues")
    if ax is None:
        fig = Figure(figsize=(max(6.0, min(16.0, 0.08 * n + 4.0)), 3.2), layout="constrained")
        ax = fig.subplots()
    else:
        fig = ax.get_figure()
    x = np.arange(1, n + 1)
    finite = np.isfinite(values)
    shown = np.where(finite, values, 0.0)
    if n <= _BARS_UP_TO:
        colors = np.where(shown >= 0, "tab:red", "tab:blue")
        ax.bar(x[finite], shown[finite], width=1.0, color=colors[finite], linewidth=0, zorder=2)
    else:  # bars of sub-pixel width vanish: filled areas instead
        ax.fill_between(x, 0, shown, where=finite & (shown >= 0), color="tab:red", lw=0, step="mid", zorder=2)
        ax.fill_between(x, 0, shown, where=finite & (shown < 0), color="tab:blue", lw=0, step="mid", zorder=2)
    ax.axhline(0.0, color="k", lw=0.5, zorder=3)
    if not finite.all():
        # the clipped middle: contiguous NaN runs, shaded
        edges = np.flatnonzero(np.diff(np.concatenate([[0], (~finite).astype(int), [0]])))
        for lo, hi in zip(edges[::2], edges[1::2], strict=True):
            ax.axvspan(lo + 0.5, hi + 0.5, color="0.85", lw=0, zorder=0)
        ax.annotate(
            "not seen (clipped)",
            ((edges[0] + edges[1]) / 2 + 0.5, 0.02),
            xycoords=("data", "axes fraction"),
            ha="center",
            va="bottom",
            fontsize=7,
            color="0.4",
        )
    if peak is not None:
        start, end = int(peak[0]), int(peak[1])
        if not 1 <= start <= end <= n:
            raise InputError(f"peak {start}-{end} lies outside the sequence (1-{n})")
        ax.axvspan(start - 0.5, end + 0.5, color="gold", alpha=0.35, lw=0, zorder=0)
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi + 0.15 * (hi - lo))  # room for the label above the bars
        middle = (start + end) / 2
        ha = "left" if middle < 0.2 * n else "right" if middle > 0.8 * n else "center"
        anchor = {"left": start - 0.5, "right": end + 0.5, "center": middle}[ha]
        ax.annotate(
            f"peak {start}-{end} {seq[start - 1 : end]}",
            (anchor, 0.98),
            xycoords=("data", "axes fraction"),
            ha=ha,
            va="top",
            fontsize=8,
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8},
            zorder=4,
        )
    ax.set_xlim(0.5, n + 0.5)
    if n <= _LETTERS_UP_TO:
        ax.set_xticks(x)
        ax.set_xticklabels(list(seq), fontsize=6 if n > 40 else 8, family="monospace")
        ax.set_xlabel(f"residue (1-{n})")
    else:
        ax.set_xlabel("residue position")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    return fig
