"""Figures of in-silico screens and residue attention (CELL-E Fig. 4-6).

- :func:`plot_screen`: the change in nucleus proportion of every variant of
  :func:`protloc.analysis.screens.predict_variants`, along the sequence when every variant has its own
  position (deletion scans, truncation series, one substitution per position), as points per position
  when several variants share one (full mutational scans), else one bar per variant (insertion screens).
- :func:`plot_constructs`: the engineered-construct experiment (GFP vs GFP + NLS, Fig. 4) over several
  nucleus images.
- :func:`plot_residue_attention`: the per-residue attention of
  :func:`protloc.analysis.screens.residue_attention` for protein-present and background patches, and their
  difference, with the top residues labelled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from protloc.errors import InputError

__all__ = ["plot_constructs", "plot_residue_attention", "plot_screen"]

_REQUIRED = ("name", "kind", "position", "nucleus_proportion", "delta")


def _axes(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is None:
        fig = Figure(figsize=size, layout="constrained")
        return fig, fig.subplots()
    return ax.get_figure(), ax


def plot_screen(df: pd.DataFrame, *, ax: Axes | None = None, title: str | None = None) -> Figure:
    """Change in nucleus proportion (variant minus wild type) of a screen.

    Parameters
    ----------
    df
        The table of :func:`~protloc.analysis.screens.predict_variants` (columns ``name``, ``kind``, ``position``,
        ``nucleus_proportion``, ``delta``, optionally ``sd``); row 0 is the reference (wild type).
    ax
        Axes to draw on; default a new figure.
    title
        Axes title; default names the reference and its nucleus proportion.

    Returns
    -------
    matplotlib.figure.Figure
        Bars of ``delta`` (blue: more nuclear, red: less), error bars of ``sd`` where finite, and a line at 0
        (the wild type). X axis: residue number (1-based position of the change) when every variant has a
        distinct position; points per residue when positions repeat; else one bar per variant name.
    """
    missing = [c for c in _REQUIRED if c not in df.columns]
    if missing:
        raise InputError(f"screen table lacks column(s) {', '.join(missing)} (expected run_screen's output)")
    if len(df) == 0:
        raise InputError("empty screen table")
    ref = df.iloc[0]
    rest = df.iloc[1:]
    delta = rest["delta"].to_numpy(dtype=float)
    sd = rest["sd"].to_numpy(dtype=float) if "sd" in rest.columns else np.full(len(rest), np.nan)
    err = np.where(np.isfinite(sd), sd, 0.0) if np.isfinite(sd).any() else None
    colors = np.where(delta >= 0, "tab:blue", "tab:red")
    pos = pd.to_numeric(rest["position"], errors="coerce").to_numpy(dtype=float)
    by_position = len(rest) > 0 and np.isfinite(pos).all()
    unique = by_position and len(np.unique(pos)) == len(pos)
    fig, ax = _axes(ax, (7.0, 3.2) if by_position else (max(4.0, 0.45 * len(df) + 2.0), 3.6))
    if unique:
        x = pos + 1
        width = float(np.min(np.diff(np.sort(x)))) * 0.8 if len(x) > 1 else 0.8
        ax.bar(x, delta, width=width, color=colors, yerr=err, ecolor="0.4", capsize=0)
        ax.set_xlabel("residue (start of the change)")
    elif by_position:
        x = pos + 1
        ax.scatter(x, delta, s=10, c=colors, alpha=0.7, linewidths=0)
        means = rest.assign(_x=x, _d=delta).groupby("_x")["_d"].mean()
        ax.plot(means.index.to_numpy(), means.to_numpy(), color="0.2", lw=1.0, label="mean per residue")
        ax.legend(loc="best", fontsize=7, frameon=False)
        ax.set_xlabel("residue")
    else:
        x = np.arange(len(rest))
        ax.bar(x, delta, color=colors, yerr=err, ecolor="0.4", capsize=2)
        ax.set_xticks(x, [str(n) for n in rest["name"]], rotation=45, ha="right", fontsize=8)
        ax.set_xlabel("variant")
    ax.axhline(0.0, color="k", lw=1.0, ls="--")
    ax.set_ylabel("Δ nucleus proportion")
    ax.set_title(title or f"vs {ref['name']} (nucleus proportion {float(ref['nucleus_proportion']):.3f})", fontsize=10)
    return fig


def plot_residue_attention(result: Mapping[str, Any], sequence: str, *, ax: Axes | None = None, top: int = 8) -> Figure:
    """Per-residue attention of protein-present vs background patches (CELL-E Fig. 6, S.3.8).

    Parameters
    ----------
    result
        Output of :func:`~protloc.analysis.screens.residue_attention`.
    sequence
        The protein (the residues of ``result``'s window are taken from it for the labels).
    ax
        Axes to draw on; default a new figure.
    top
        Label the ``top`` residues with the largest ``difference`` (present minus background).

    Returns
    -------
    matplotlib.figure.Figure
    """
    present = np.asarray(result["present"], dtype=float)
    background = np.asarray(result["background"], dtype=float)
    difference = np.asarray(result["difference"], dtype=float)
    n = len(present)
    start = int(result.get("window_start", 0))
    residues = "".join(str(sequence).split()).upper()[start : start + n]
    if len(residues) != n or len(background) != n or len(difference) != n:
        raise InputError(f"the attention covers {n} residues from {start + 1}; the sequence gives {len(residues)}")
    x = np.arange(start + 1, start + n + 1)
    fig, ax = _axes(ax, (max(6.0, min(16.0, 0.06 * n + 4.0)), 3.4))
    ax.plot(x, present, color="tab:green", lw=1.2, label=f"present ({result.get('n_present', '?')} patches)")
    ax.plot(x, background, color="0.5", lw=1.0, label=f"background ({result.get('n_background', '?')} patches)")
    ax.plot(x, difference, color="tab:purple", lw=1.0, ls="--", label="present - background")
    ax.axhline(0.0, color="k", lw=0.5)
    finite = np.isfinite(difference)
    if top > 0 and finite.any():
        order = np.argsort(np.where(finite, difference, -np.inf))[::-1][: min(top, int(finite.sum()))]
        for i in order:
            ax.annotate(
                f"{residues[i]}{x[i]}",
                (x[i], difference[i]),
                textcoords="offset points",
                xytext=(0, 4),
                ha="center",
                fontsize=7,
                color="tab:purple",
            )
    method = result.get("method", "")
    ax.set_xlabel("residue")
    ax.set_ylabel(f"attention ({method})" if method else "attention")
    ax.legend(loc="best", fontsize=7, frameon=False)
    return fig


def plot_constructs(per_image: pd.DataFrame, *, ax: Axes | None = None, title: str | None = None) -> Figure:
    """Nucleus proportion of engineered constructs on several nucleus images (CELL-E Fig. 4).

    Parameters
    ----------
    per_image
        The first table of :func:`~protloc.analysis.screens.construct_experiment` (``image``,
        ``construct``, ``nucleus_proportion``); constructs are drawn in their order of appearance.
    ax
        Axes to draw on; default a new figure.
    title
        Axes title.

    Returns
    -------
    matplotlib.figure.Figure
        One column per construct: a bar at the mean and a grey line per nucleus image joining its
        constructs (the same image and sampling noise), so a construct that raises the nucleus proportion
        on every image shows as lines that all go up.
    """
    missing = [c for c in ("image", "construct", "nucleus_proportion") if c not in per_image.columns]
    if missing:
        raise InputError(f"construct table lacks column(s) {', '.join(missing)}")
    if len(per_image) == 0:
        raise InputError("empty construct table")
    names = list(dict.fromkeys(per_image["construct"]))
    wide = per_image.pivot(index="image", columns="construct", values="nucleus_proportion")[names]
    fig, ax = _axes(ax, (max(4.0, 1.1 * len(names) + 1.5), 3.6))
    x = np.arange(len(names))
    ax.bar(x, wide.mean(axis=0).to_numpy(), color="tab:blue", alpha=0.35, width=0.6)
    for _, row in wide.iterrows():
        ax.plot(x, row.to_numpy(dtype=float), color="0.35", lw=0.8, marker="o", ms=3, alpha=0.8)
    ax.set_xticks(x, [str(n).replace("_", " ") for n in names], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("nucleus proportion")
    ax.set_title(title or f"constructs on {len(wide)} nucleus images", fontsize=10)
    return fig
