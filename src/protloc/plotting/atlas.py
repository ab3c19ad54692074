"""The localization atlas as a figure (matplotlib) and as one self-contained interactive HTML file.

Paper Fig. 2: every point is a crop of the test set at its UMAP position, coloured by the
localization category of its protein; crops of proteins with other or mixed localizations are grey
and drawn underneath.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from protloc._fs import atomic_write_text
from protloc.errors import InputError

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["atlas_html", "category_palette", "plot_atlas"]

UNLABELED_COLOR = "#c8c8c8"


def category_palette(
    categories: Sequence[Hashable],
    palette: Mapping[Hashable, str] | Sequence[str] | str | None = None,
) -> dict[Hashable, str]:
    """Hex colour of every category.

    Parameters
    ----------
    categories
        Categories in legend order.
    palette
        Mapping category -> colour (missing ones get default colours), a sequence of colours
        (cycled), a matplotlib colormap name, or ``None``: tab10 / tab20 / tab20+tab20b+tab20c by
        the number of categories, evenly spaced hues beyond 60.

    Returns
    -------
    dict
        Category -> ``"#rrggbb"``.
    """
    cats = list(categories)
    n = len(cats)
    if isinstance(palette, str):
        cmap = colormaps[palette]
        if getattr(cmap, "N", 256) < 256:  # qualitative map: cycle its colours
            default = [to_hex(cmap(i % cmap.N)) for i in range(n)]
        else:
            default = [to_hex(cmap(t)) for t in np.linspace(0, 1, max(n, 1))]
    elif palette is not None and not isinstance(palette, Mapping):
        cols = list(palette)
        if not cols:
            raise ValueError("palette is empty")
        default = [to_hex(cols[i % len(cols)]) for i in range(n)]
    else:
        if n <= 10:
            base = [to_hex(c) for c in colormaps["tab10"].colors]
        elif n <= 20:
            base = [to_hex(c) for c in colormaps["tab20"].colors]
        else:
            base = [to_hex(c) for name in ("tab20", "tab20b", "tab20c") for c in colormaps[name].colors]
        if n > len(base):
            base = [to_hex(colormaps["hsv"](t)) for t in np.linspace(0, 1, n, endpoint=False)]
        default = base[:n]
    out = dict(zip(cats, default, strict=True))
    if isinstance(palette, Mapping):
        for c in cats:
            if c in palette:
                out[c] = to_hex(palette[c])
    return out


def _resolve(
    data: AnnData | np.ndarray,
    labels: Sequence[Hashable] | np.ndarray | pd.Series | None,
    color: str,
    basis: str,
) -> tuple[np.ndarray, pd.Series]:
    """Coordinates and colour values (non-finite coordinates dropped)."""
    if isinstance(data, np.ndarray) or not hasattr(data, "obsm"):
        xy = np.asarray(data, dtype=np.float64)
        if labels is None:
            raise InputError("pass labels= with a coordinate array")
        values = labels if isinstance(labels, pd.Series) else pd.Series(np.asarray(labels).reshape(-1))
    else:
        if basis not in data.obsm:
            raise InputError(f"{basis!r} not in adata.obsm; run protloc.analysis.atlas first")
        xy = np.asarray(data.obsm[basis], dtype=np.float64)
        if labels is not None:
            values = labels if isinstance(labels, pd.Series) else pd.Series(np.asarray(labels).reshape(-1))
        elif color in data.obs:
            values = data.obs[color]
        else:
            raise InputError(f"column {color!r} not in adata.obs")
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise InputError(f"coordinates must be [N, 2], got shape {xy.shape}")
    if len(values) != xy.shape[0]:
        raise InputError(f"{len(values)} labels for {xy.shape[0]} points")
    ok = np.isfinite(xy[:, :2]).all(axis=1)
    return xy[ok, :2], values.reset_index(drop=True)[ok].reset_index(drop=True)


def _is_continuous(values: pd.Series) -> bool:
    return (
        not isinstance(values.dtype, pd.CategoricalDtype)
        and pd.api.types.is_numeric_dtype(values)
        and not pd.api.types.is_bool_dtype(values)
        and values.nunique() > 20
    )


def plot_atlas(
    data: AnnData | np.ndarray,
    *,
    labels: Sequence[Hashable] | np.ndarray | pd.Series | None = None,
    color: str = "label",
    basis: str = "X_umap",
    ax: Axes | None = None,
    palette: Mapping[Hashable, str] | Sequence[str] | str | None = None,
    point_size: float | None = None,
    unlabeled: Iterable[Hashable] = ("",),
    legend: bool = True,
    title: str | None = None,
    alpha: float = 0.8,
    seed: int = 0,
) -> Figure:
    """Scatter plot of the atlas (paper Fig. 2).

    Unlabelled points (missing values or values in ``unlabeled``) are drawn first, in grey; the
    labelled points are drawn on top in a random order, so no class systematically hides another.
    A numeric colour column with many values is drawn with a colormap and a colour bar instead.

    Parameters
    ----------
    data
        AnnData with ``obsm[basis]`` (rows with NaN coordinates, e.g. crops outside the atlas split,
        are skipped), or an ``[N, 2]`` coordinate array together with ``labels``.
    labels
        Colour values (overrides ``obs[color]``).
    color
        ``obs`` column to colour by.
    basis
        ``obsm`` key of the coordinates.
    ax
        Axes to draw into; ``None`` makes a new figure.
    palette
        See :func:`category_palette`.
    point_size
        Marker area in points^2; ``None`` scales with the number of points.
    unlabeled
        Values drawn grey and left out of the legend.
    legend
        Draw a legend (class name and number of points), right of the axes.
    title
        Axes title.
    alpha
        Marker opacity of the labelled points.
    seed
        Seed of the drawing order.

    Returns
    -------
    matplotlib.figure.Figure
    """
    xy, values = _resolve(data, labels, color, basis)
    n = len(xy)
    if ax is None:
        fig = Figure(figsize=(8.0, 6.5), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure  # type: ignore[assignment]
    size = point_size if point_size is not None else float(np.clip(4000.0 / max(n, 1), 0.3, 30.0))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_aspect("equal", adjustable="datalim")
    if title:
        ax.set_title(title)
    if n == 0:
        return fig  # type: ignore[return-value]

    if _is_continuous(values):
        v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
        nan = ~np.isfinite(v)
        ax.scatter(xy[nan, 0], xy[nan, 1], s=size, c=UNLABELED_COLOR, linewidths=0, rasterized=True)
        sc = ax.scatter(xy[~nan, 0], xy[~nan, 1], s=size, c=v[~nan], cmap="viridis", linewidths=0, rasterized=True)
        fig.colorbar(sc, ax=ax, label=color, shrink=0.8)
        return fig  # type: ignore[return-value]

    obj = values.astype(object)
    miss = obj.isna().to_numpy() | obj.isin(list(unlabeled)).to_numpy()
    lab = obj[~miss].astype(str).to_numpy()
    cats, counts = np.unique(lab, return_counts=True)
    colors = category_palette(list(cats), palette)
    ax.scatter(xy[miss, 0], xy[miss, 1], s=size, c=UNLABELED_COLOR, linewidths=0, rasterized=True)
    if len(lab):
        order = np.random.default_rng(seed).permutation(len(lab))
        pts = xy[~miss][order]
        cols = np.array([colors[c] for c in cats])[np.searchsorted(cats, lab[order])]
        ax.scatter(pts[:, 0], pts[:, 1], s=size, c=list(cols), alpha=alpha, linewidths=0, rasterized=True)
    if legend and len(cats):
        handles = [
            Line2D([], [], marker="o", linestyle="", markersize=6, color=colors[c], label=f"{c} ({k})")
            for c, k in zip(cats, counts, strict=True)
        ]
        if miss.any():
            handles.append(
                Line2D(
                    [], [], marker="o", linestyle="", markersize=6, color=UNLABELED_COLOR, label=f"other ({miss.sum()})"
                )
            )
        ax.legend(
            handles=handles,
            loc="center left",
            bbox_to_anchor=(1.01, 0.5),
            frameon=False,
            fontsize="small",
            ncols=1 if len(handles) <= 25 else 2,
        )
    return fig  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# interactive HTML
# --------------------------------------------------------------------------------------------------


def _script_json(obj: Any) -> str:
    """JSON that is safe inside a ``<script>`` element: no ``<``, ``>`` or ``&`` characters at all.

    They can only occur inside JSON strings, where ``\\u003c`` etc. are valid escapes, so no value
    can close the element (``</script>``) or open a comment; ``ensure_ascii`` also escapes U+2028/9.
    """
    text = json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _png_data_url(image: np.ndarray, max_size: int) -> str:
    """Encode an image as a ``data:image/png;base64,...`` URL (scaled down to ``max_size``)."""
    from PIL import Image

    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # channels-first
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise InputError(f"thumbnail must be [H, W], [H, W, 3] or [H, W, 4], got shape {a.shape}")
    if a.dtype != np.uint8:
        f = np.nan_to_num(a.astype(np.float64))
        if np.issubdtype(a.dtype, np.integer) or f.max(initial=0.0) > 1.0:
            hi = f.max(initial=0.0)
            f = f / hi if hi > 0 else f
        a = (np.clip(f, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    img = Image.fromarray(a)
    if max(img.size) > max_size:
        img.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _round_coords(v: np.ndarray) -> list[float]:
    """Coordinates rounded to ~1e-5 of their range (keeps the file small, invisible on screen)."""
    span = float(np.ptp(v)) if len(v) else 0.0
    decimals = int(np.clip(5 - np.floor(np.log10(span)) if span > 0 else 5, 0, 12))
    return [float(x) for x in np.round(v.astype(np.float64), decimals)]


def atlas_html(
    coords: np.ndarray,
    obs: pd.DataFrame,
    *,
    path: str | os.PathLike,
    color: str = "label",
    hover: Sequence[str] | None = None,
    thumbnails: Sequence[np.ndarray | None] | None = None,
    thumbnail_size: int = 96,
    title: str = "protloc localization atlas",
    palette: Mapping[Hashable, str] | Sequence[str] | str | None = None,
    unlabeled: Iterable[Hashable] = ("",),
    point_size: float = 2.5,
    seed: int = 0,
) -> Path:
    """Write the atlas as ONE self-contained interactive HTML file (no network needed to view it).

    A hand-written canvas renderer (no plotting library, a few kB of JavaScript): drag to pan,
    wheel to zoom around the cursor, double-click to reset; hovering a point shows its ``hover``
    fields and, when given, its crop thumbnail; the legend toggles categories (click) or shows one
    alone (double-click); a search box highlights the points whose first hover field (the protein)
    contains the text. Unlabelled points are grey and drawn underneath.

    All strings are embedded as JSON with ``<``, ``>`` and ``&`` escaped and are inserted into the
    page as text, never as markup.

    Parameters
    ----------
    coords
        ``[N, 2]`` coordinates; rows with NaN are skipped (with their thumbnails).
    obs
        ``N`` rows of per-point annotations (``adata.obs``).
    path
        Output file; written atomically.
    color
        ``obs`` column of the categories to colour by (values are shown as text).
    hover
        ``obs`` columns shown on hover; default: those of ``protein_id``, ``label``, ``fov_id``,
        ``split`` that exist, plus ``color``.
    thumbnails
        Optional per-point images (``[H, W]`` grey or ``[H, W, 3|4]`` RGB(A); float in [0, 1] or
        uint8; ``None`` entries for points without one), e.g. from
        :func:`protloc.plotting.crops.composite`. Each is embedded as a PNG of at most
        ``thumbnail_size`` pixels a side (~5-15 kB per crop): give them for a subsample when N is
        large.
    thumbnail_size
        Longest side of an embedded thumbnail, in pixels.
    title
        Page title.
    palette, unlabeled
        As in :func:`plot_atlas`.
    point_size
        Initial point radius in CSS pixels (adjustable in the page).
    seed
        Seed of the drawing order of the labelled points.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    xy = np.asarray(coords, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise InputError(f"coords must be [N, 2], got shape {xy.shape}")
    if len(obs) != xy.shape[0]:
        raise InputError(f"obs has {len(obs)} rows for {xy.shape[0]} points")
    if color not in obs:
        raise InputError(f"column {color!r} not in obs")
    if thumbnails is not None and len(thumbnails) != xy.shape[0]:
        raise InputError(f"{len(thumbnails)} thumbnails for {xy.shape[0]} points")
    if hover is None:
        hover = [c for c in ("protein_id", "label", "fov_id", "split") if c in obs]
        if color not in hover:
            hover.append(color)
    missing_cols = [c for c in hover if c not in obs]
    if missing_cols:
        raise InputError(f"hover columns not in obs: {missing_cols}")

    ok = np.isfinite(xy[:, :2]).all(axis=1)
    keep = np.flatnonzero(ok)
    xy = xy[keep, :2]
    sub = obs.iloc[keep]

    obj = sub[color].astype(object)
    miss = (obj.isna() | obj.isin(list(unlabeled))).to_numpy()
    names = obj.where(~obj.isna(), "").astype(str).to_numpy()
    labelled = np.unique(names[~miss])
    colors = category_palette(list(labelled), palette)
    unl_names = np.unique(names[miss])
    categories = [str(c) for c in labelled] + [str(c) for c in unl_names]
    cat_code = {c: i for i, c in enumerate(categories)}
    codes = np.array([cat_code[c] for c in names], dtype=np.int64)
    cat_colors = [colors[c] for c in labelled] + [UNLABELED_COLOR] * len(unl_names)
    counts = np.bincount(codes, minlength=len(categories)).tolist() if len(codes) else [0] * len(categories)

    # Draw order: unlabelled first, labelled ones on top in a random order.
    rng = np.random.default_rng(seed)
    order = np.concatenate([np.flatnonzero(miss), rng.permutation(np.flatnonzero(~miss))]).astype(np.int64)

    fields = []
    for col in hover:
        v = sub[col].astype(object)
        v = v.where(~v.isna(), "").astype(str).to_numpy()
        u, inv = np.unique(v, return_inverse=True)  # values repeat (~100 crops per protein)
        fields.append({"name": str(col), "values": u.tolist(), "codes": inv.astype(int).tolist()})

    thumbs: dict[str, str] = {}
    if thumbnails is not None:
        for j, i in enumerate(keep):
            t = thumbnails[i]
            if t is not None:
                thumbs[str(j)] = _png_data_url(t, thumbnail_size)

    payload = {
        "title": str(title),
        "colorBy": str(color),
        "x": _round_coords(xy[:, 0]),
        "y": _round_coords(xy[:, 1]),
        "c": codes.tolist(),
        "order": order.tolist(),
        "categories": categories,
        "displayNames": [c if c else "(unlabelled)" for c in categories],
        "colors": cat_colors,
        "counts": counts,
        "unlabelled": [cat_code[str(c)] for c in unl_names],
        "fields": fields,
        "thumbs": thumbs,
        "pointSize": float(point_size),
    }
    page = (
        _HTML_TEMPLATE.replace("%%TITLE%%", html.escape(str(title), quote=True))
        .replace("%%STYLE%%", _CSS)
        .replace("%%SCRIPT%%", _JS)
        .replace("%%DATA%%", _script_json(payload))
    )
    return Path(atomic_write_text(path, page))


_HTML_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%%TITLE%%</title>
<style>%%STYLE%%</style>
</head>
<body>
<header><h1>%%TITLE%%</h1><span id="status"></span></header>
<main>
<div id="plot"><canvas id="canvas"></canvas><div id="tooltip" hidden></div></div>
<aside id="side">
<div class="controls">
<input id="search" type="search" placeholder="highlight protein..." autocomplete="off">
<label>point size <input id="size" type="range" min="0.5" max="12" step="0.5"></label>
<div class="buttons"><button id="all">all</button><button id="none">none</button>
<button id="reset">reset view</button></div>
</div>
<div id="legend"></div>
<p class="help">drag: pan &middot; wheel: zoom &middot; double-click: reset<br>
legend: click toggles, double-click shows one category alone</p>
</aside>
</main>
<script id="atlas-data" type="application/json">%%DATA%%</script>
<script>%%SCRIPT%%</script>
</body>
</html>
"""

_CSS = """
html,body{margin:0;height:100%;font:13px system-ui,-apple-system,"Segoe UI",sans-serif;color:#222}
body{display:flex;flex-direction:column}
header{display:flex;align-items:baseline;gap:1em;padding:6px 12px;border-bottom:1px solid #ddd}
h1{font-size:16px;margin:0}
#status{color:#666}
main{flex:1;display:flex;min-height:0}
#plot{flex:1;position:relative;min-width:0;background:#fff}
#canvas{position:absolute;inset:0;width:100%;height:100%;cursor:grab;touch-action:none}
#canvas.dragging{cursor:grabbing}
#tooltip{position:absolute;pointer-events:none;background:rgba(255,255,255,.96);border:1px solid #999;
border-radius:4px;padding:6px 8px;box-shadow:0 2px 6px rgba(0,0,0,.2);max-width:260px;z-index:2}
#tooltip img{display:block;margin-top:4px;image-rendering:pixelated;width:128px;height:auto}
#tooltip .k{color:#666}
aside{width:250px;overflow:auto;border-left:1px solid #ddd;padding:8px}
.controls input[type=search]{width:100%;box-sizing:border-box;margin-bottom:6px}
.controls label{display:block;margin-bottom:6px}
.buttons button{margin:0 4px 6px 0}
.item{display:flex;align-items:center;gap:6px;padding:2px 0;cursor:pointer;user-select:none}
.item.off{opacity:.35}
.sw{width:12px;height:12px;border-radius:50%;flex:none}
.item .n{color:#888;margin-left:auto}
.help{color:#777;font-size:11px}
"""

_JS = r"""
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("atlas-data").textContent);
  const N = D.x.length, X = Float64Array.from(D.x), Y = Float64Array.from(D.y);
  const C = Int32Array.from(D.c), ORDER = Int32Array.from(D.order);
  const K = D.categories.length;
  const visible = new Array(K).fill(true);
  const canvas = document.getElementById("canvas"), ctx = canvas.getContext("2d");
  const tip = document.getElementById("tooltip"), status = document.getElementById("status");
  const search = document.getElementById("search"), sizeInput = document.getElementById("size");
  let radius = D.pointSize, W = 0, H = 0, dpr = 1;
  let view = {cx: 0, cy: 0, scale: 1}, hovered = -1, highlight = null, pending = false;
  sizeInput.value = String(radius);

  // ---- view: data -> screen is sx = (x - cx) * scale + W / 2, sy = H / 2 - (y - cy) * scale
  function bounds() {
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity, any = false;
    for (let i = 0; i < N; i++) {
      if (!visible[C[i]]) continue;
      any = true;
      if (X[i] < x0) x0 = X[i]; if (X[i] > x1) x1 = X[i];
      if (Y[i] < y0) y0 = Y[i]; if (Y[i] > y1) y1 = Y[i];
    }
    return any ? [x0, x1, y0, y1] : [0, 1, 0, 1];
  }
  function fit() {
    const [x0, x1, y0, y1] = bounds();
    const sx = (W * 0.92) / Math.max(x1 - x0, 1e-9), sy = (H * 0.92) / Math.max(y1 - y0, 1e-9);
    view = {cx: (x0 + x1) / 2, cy: (y0 + y1) / 2, scale: Math.max(Math.min(sx, sy), 1e-9)};
  }
  const toSX = (x) => (x - view.cx) * view.scale + W / 2;
  const toSY = (y) => H / 2 - (y - view.cy) * view.scale;
  const toDX = (sx) => (sx - W / 2) / view.scale + view.cx;
  const toDY = (sy) => view.cy - (sy - H / 2) / view.scale;

  // ---- spatial grid in data space, for hover lookup
  const GX = Math.max(1, Math.ceil(Math.sqrt(N / 4)));
  let gx0 = Infinity, gx1 = -Infinity, gy0 = Infinity, gy1 = -Infinity;
  for (let i = 0; i < N; i++) {
    if (X[i] < gx0) gx0 = X[i]; if (X[i] > gx1) gx1 = X[i];
    if (Y[i] < gy0) gy0 = Y[i]; if (Y[i] > gy1) gy1 = Y[i];
  }
  const gw = Math.max(gx1 - gx0, 1e-9) / GX, gh = Math.max(gy1 - gy0, 1e-9) / GX;
  const cellOf = (v, v0, w) => Math.min(GX - 1, Math.max(0, Math.floor((v - v0) / w)));
  const cellStart = new Int32Array(GX * GX + 1), cellItems = new Int32Array(N);
  {
    const cell = new Int32Array(N);
    for (let i = 0; i < N; i++) {
      cell[i] = cellOf(Y[i], gy0, gh) * GX + cellOf(X[i], gx0, gw);
      cellStart[cell[i] + 1]++;
    }
    for (let j = 0; j < GX * GX; j++) cellStart[j + 1] += cellStart[j];
    const fill = cellStart.slice(0, GX * GX);
    for (let i = 0; i < N; i++) cellItems[fill[cell[i]]++] = i;
  }
  function nearest(sx, sy) {
    const r = (radius + 4) / view.scale, x = toDX(sx), y = toDY(sy);
    const cx0 = cellOf(x - r, gx0, gw), cx1 = cellOf(x + r, gx0, gw);
    const cy0 = cellOf(y - r, gy0, gh), cy1 = cellOf(y + r, gy0, gh);
    let best = -1, bestD = r * r;
    for (let cy = cy0; cy <= cy1; cy++) for (let cx = cx0; cx <= cx1; cx++) {
      const c = cy * GX + cx;
      for (let k = cellStart[c]; k < cellStart[c + 1]; k++) {
        const i = cellItems[k];
        if (!visible[C[i]]) continue;
        const dx = X[i] - x, dy = Y[i] - y, d = dx * dx + dy * dy;
        if (d <= bestD) { bestD = d; best = i; }
      }
    }
    return best;
  }

  // ---- drawing
  function draw() {
    pending = false;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, W, H);
    const r = radius, s = 2 * r;
    let style = "", shown = 0;
    for (let k = 0; k < N; k++) {
      const i = ORDER[k];
      if (!visible[C[i]]) continue;
      const sx = toSX(X[i]), sy = toSY(Y[i]);
      if (sx < -s || sy < -s || sx > W + s || sy > H + s) continue;
      const col = D.colors[C[i]];
      if (col !== style) { ctx.fillStyle = col; style = col; }
      ctx.fillRect(sx - r, sy - r, s, s);
      shown++;
    }
    if (highlight) {
      ctx.strokeStyle = "#000"; ctx.lineWidth = 1.5;
      for (let i = 0; i < N; i++) {
        if (!highlight[i] || !visible[C[i]]) continue;
        ctx.beginPath(); ctx.arc(toSX(X[i]), toSY(Y[i]), r + 3, 0, 2 * Math.PI); ctx.stroke();
      }
    }
    if (hovered >= 0) {
      ctx.strokeStyle = "#000"; ctx.lineWidth = 2;
      ctx.beginPath(); ctx.arc(toSX(X[hovered]), toSY(Y[hovered]), r + 4, 0, 2 * Math.PI); ctx.stroke();
    }
    let msg = shown + " of " + N + " points in view";
    if (highlight) msg += " \u00b7 " + highlight.count + " highlighted";
    status.textContent = msg;
  }
  function redraw() { if (!pending) { pending = true; requestAnimationFrame(draw); } }
  function resize(refit) {
    const rect = canvas.getBoundingClientRect();
    dpr = window.devicePixelRatio || 1;
    W = Math.max(rect.width, 1); H = Math.max(rect.height, 1);
    canvas.width = Math.round(W * dpr); canvas.height = Math.round(H * dpr);
    if (refit) fit();
    redraw();
  }

  // ---- tooltip (text only, never markup)
  function showTip(i, sx, sy) {
    tip.replaceChildren();
    for (const f of D.fields) {
      const line = document.createElement("div"), k = document.createElement("span");
      k.className = "k"; k.textContent = f.name + ": ";
      line.append(k, document.createTextNode(f.values[f.codes[i]]));
      tip.append(line);
    }
    const t = D.thumbs[String(i)];
    if (t) { const img = document.createElement("img"); img.src = t; img.alt = "crop"; tip.append(img); }
    tip.hidden = false;
    const pw = canvas.clientWidth, ph = canvas.clientHeight, tw = tip.offsetWidth, th = tip.offsetHeight;
    tip.style.left = Math.min(sx + 14, Math.max(0, pw - tw - 4)) + "px";
    tip.style.top = Math.min(sy + 14, Math.max(0, ph - th - 4)) + "px";
  }

  // ---- interaction
  let drag = null;
  canvas.addEventListener("pointerdown", (e) => {
    drag = {x: e.clientX, y: e.clientY, cx: view.cx, cy: view.cy};
    try { canvas.setPointerCapture(e.pointerId); } catch (err) { /* synthetic events */ }
    canvas.classList.add("dragging");
  });
  canvas.addEventListener("pointermove", (e) => {
    const rect = canvas.getBoundingClientRect(), sx = e.clientX - rect.left, sy = e.clientY - rect.top;
    if (drag) {
      view.cx = drag.cx - (e.clientX - drag.x) / view.scale;
      view.cy = drag.cy + (e.clientY - drag.y) / view.scale;
      tip.hidden = true; hovered = -1; redraw(); return;
    }
    const i = nearest(sx, sy);
    if (i !== hovered) { hovered = i; redraw(); }
    if (i >= 0) showTip(i, sx, sy); else tip.hidden = true;
  });
  const endDrag = () => { drag = null; canvas.classList.remove("dragging"); };
  canvas.addEventListener("pointerup", endDrag);
  canvas.addEventListener("pointercancel", endDrag);
  canvas.addEventListener("pointerleave", () => { if (!drag) { tip.hidden = true; hovered = -1; redraw(); } });
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    const rect = canvas.getBoundingClientRect(), sx = e.clientX - rect.left, sy = e.clientY - rect.top;
    const x = toDX(sx), y = toDY(sy), f = Math.exp(-e.deltaY * (e.deltaMode === 1 ? 0.05 : 0.0015));
    view.scale *= f;
    view.cx = x - (sx - W / 2) / view.scale; view.cy = y + (sy - H / 2) / view.scale;
    redraw();
  }, {passive: false});
  canvas.addEventListener("dblclick", () => { fit(); redraw(); });
  document.getElementById("reset").addEventListener("click", () => { fit(); redraw(); });
  sizeInput.addEventListener("input", () => { radius = parseFloat(sizeInput.value) || radius; redraw(); });
  search.addEventListener("input", () => {
    const q = search.value.trim().toLowerCase();
    if (!q || !D.fields.length) { highlight = null; redraw(); return; }
    const f = D.fields[0], match = f.values.map((v) => v.toLowerCase().includes(q));
    highlight = new Uint8Array(N); highlight.count = 0;
    for (let i = 0; i < N; i++) if (match[f.codes[i]]) { highlight[i] = 1; highlight.count++; }
    redraw();
  });

  // ---- legend
  const legend = document.getElementById("legend"), items = [];
  function syncLegend() { items.forEach((el, k) => el.classList.toggle("off", !visible[k])); redraw(); }
  for (let k = 0; k < K; k++) {
    const el = document.createElement("div"), sw = document.createElement("span");
    const name = document.createElement("span"), n = document.createElement("span");
    el.className = "item"; sw.className = "sw"; sw.style.background = D.colors[k];
    name.textContent = D.displayNames[k]; n.className = "n"; n.textContent = String(D.counts[k]);
    el.append(sw, name, n);
    el.addEventListener("click", () => { visible[k] = !visible[k]; syncLegend(); });
    el.addEventListener("dblclick", () => { visible.fill(false); visible[k] = true; syncLegend(); });
    legend.append(el); items.push(el);
  }
  document.getElementById("all").addEventListener("click", () => { visible.fill(true); syncLegend(); });
  document.getElementById("none").addEventListener("click", () => { visible.fill(false); syncLegend(); });

  window.addEventListener("resize", () => resize(false));
  resize(true);
  window.__atlas = {n: N, categories: K, ready: true};
})();
"""
