"""The demo report: one self-contained HTML page (no network at view time) plus its PNGs and ``metrics.json``.

:func:`build_report` reads the stage folders of a :mod:`protloc.demo` run and writes ``report/``:

- ``index.html``: every figure embedded as a PNG data URL, the interactive cytoself atlas (the page of
  :func:`protloc.plotting.atlas.atlas_html`, embedded in an ``iframe`` ``srcdoc``), metric tables beside
  the baselines and the VQGAN ceiling;
- the PNGs themselves, for slides and papers;
- ``metrics.json``: the numbers of the page in one file.

The page reports its own script errors in a red banner (and in ``data-errors`` on ``<body>``); once
loaded it records whether the atlas drew and how many gallery images decoded in ``data-atlas`` and
``data-gallery`` on ``<body>`` (what the headless-browser test checks).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from protloc import __version__
from protloc._fs import atomic_dir, atomic_write_json, atomic_write_text, json_ready
from protloc.errors import InputError

logger = logging.getLogger(__name__)

__all__ = ["build_report"]

# Rows and columns of the CELL-E evaluation table, in the paper's order (Table S.1).
_EVAL_METRICS = (
    ("nucleus_proportion_accuracy", "nucleus-proportion accuracy"),
    ("threshold_pixel_accuracy", "threshold pixel accuracy"),
    ("pdf_pixel_accuracy", "PDF pixel accuracy"),
    ("ssim", "SSIM"),
    ("nuclear_localization_correct", "nuclear call correct"),
)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise InputError(f"invalid JSON ({exc})", path=path) from exc


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return "–" if not math.isfinite(x) else f"{x:.{digits}f}"
    return str(x)


def _img(path: Path, alt: str, *, cls: str = "fig") -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img class="{cls}" alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, cls: str = "") -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _mean_sd(v: Any) -> str:
    if isinstance(v, Sequence) and len(v) == 2:
        m, s = v
        if m is None:
            return "–"
        return f"{m:.3f} ± {s:.3f}" if s is not None else f"{m:.3f}"
    return _fmt(v)


class _Page:
    def __init__(self, report_dir: Path) -> None:
        self.dir = report_dir
        self.sections: list[str] = []
        self.pngs: list[str] = []

    def png(self, src: Path, name: str, alt: str, *, cls: str = "fig") -> str:
        """Copy a PNG into the report folder and return its embedded ``<img>``."""
        shutil.copyfile(src, self.dir / name)
        self.pngs.append(name)
        return _img(src, alt, cls=cls)

    def add(self, anchor: str, title: str, body: str) -> None:
        self.sections.append(f'<section id="{anchor}"><h2>{_esc(title)}</h2>{body}</section>')


def _atlas_section(page: _Page, out: Path, metrics: dict[str, Any]) -> None:
    scores = _read_json(out / "atlas" / "scores.json")
    if scores is None:
        return
    cs = scores.get("clustering_score", {})
    knn = scores.get("knn", {}).get("features", {})
    metrics["atlas"] = {
        "crops": scores.get("n_crops"),
        "proteins": scores.get("n_proteins"),
        "clustering_score": cs.get("localization"),
        "clustering_score_by_protein": cs.get("localization_by_protein"),
        "knn_macro_f1": knn.get("macro_f1"),
        "knn_accuracy": knn.get("accuracy"),
    }
    page_html = (out / "atlas" / "atlas.html").read_text(encoding="utf-8")
    frame = (
        f'<iframe id="atlas-frame" class="atlas" title="interactive cytoself atlas" '
        f'srcdoc="{html.escape(page_html, quote=True)}"></iframe>'
    )
    table = _table(
        ["test crops", "proteins", "clustering score", "… by protein", "k-NN macro-F1", "k-NN accuracy"],
        [
            [
                scores.get("n_crops"),
                scores.get("n_proteins"),
                _fmt(cs.get("localization")),
                _fmt(cs.get("localization_by_protein")),
                _fmt(knn.get("macro_f1")),
                _fmt(knn.get("accuracy")),
            ]
        ],
    )
    static = page.png(out / "atlas" / "atlas.png", "atlas.png", "UMAP atlas (static)", cls="fig small")
    body = (
        "<p>UMAP of the cytoself global representation of every held-out test crop, coloured by the protein's "
        "localization (cytoself Fig. 2). Hover a point for its protein, label and crop; drag to pan, wheel to "
        "zoom, click the legend to hide a compartment. The clustering score is the paper's (spread of class "
        "centres over the median within-class radius); the k-NN macro-F1 predicts each crop's localization "
        "from its 15 nearest crops of <em>other</em> proteins.</p>"
        f"{frame}{table}<details><summary>static image</summary>{static}</details>"
    )
    page.add("atlas", "cytoself: localization atlas", body)


def _spectrum_section(page: _Page, out: Path, metrics: dict[str, Any], query: str | None) -> None:
    spec = _read_json(out / "spectrum" / "spectrum.json")
    if spec is None:
        return
    metrics["spectrum"] = spec
    parts = [
        "<p>Feature spectra (cytoself Fig. 4): how often each local code occurs in each protein's crops, "
        "proteins and codes biclustered; the code clusters group features of one compartment.</p>",
        page.png(out / "spectrum" / "spectrum_heatmap.png", "spectrum_heatmap.png", "feature-spectrum heatmap"),
    ]
    for name in sorted(p.name for p in (out / "spectrum").glob("spectrum_*.png")):
        if name != "spectrum_heatmap.png":
            parts.append(page.png(out / "spectrum" / name, name, f"feature spectrum {name}", cls="fig half"))
    for name in sorted(p.name for p in (out / "spectrum").glob("families_*.png")):
        parts.append(page.png(out / "spectrum" / name, name, f"family correlation {name}", cls="fig half"))
    q = spec.get("queries", {}).get(query or "", {})
    if q:
        parts.append(
            f"<p>{_esc(query)} (labelled <b>{_esc(q.get('label'))}</b>) correlates best with the "
            f"<b>{_esc(q.get('best_family'))}</b> family (r = {_fmt(q.get('r'))}).</p>"
        )
    for js in sorted((out / "interpret").glob("feature_zeroing_*.json")):
        png = js.with_suffix(".png")
        info = _read_json(js)
        metrics["feature_zeroing"] = info
        parts.append(
            "<h3>Feature zeroing (cytoself Fig. 5)</h3><p>The protein's most frequent codes, each zeroed before "
            "decoding; red shows what the code draws.</p>"
        )
        if png.is_file():
            parts.append(page.png(png, png.name, "feature zeroing"))
    page.add("spectra", "cytoself: feature spectra and interpretation", "".join(parts))


def _evaluate_section(page: _Page, out: Path, metrics: dict[str, Any]) -> None:
    ev = _read_json(out / "evaluate" / "metrics.json")
    if ev is None:
        return
    prot = ev.get("proteins", {})
    metrics["evaluate"] = {"over_proteins": prot, "over_images": ev.get("images", {}), "settings": ev.get("settings")}
    models = ev.get("models", {})
    n_img = next((m.get("images") for m in models.values() if isinstance(m, Mapping) and m.get("images")), None)
    n_prot = next((m.get("proteins") for m in models.values() if isinstance(m, Mapping) and m.get("proteins")), None)
    rows = []
    for row, vals in prot.items():
        rows.append([row] + [_mean_sd(vals.get(k)) for k, _ in _EVAL_METRICS])
    body = (
        f"<p>CELL-E on held-out proteins ({_esc(n_prot)} proteins, {_esc(n_img)} crops; mean ± sd over proteins, "
        "paper Table S.1): with the shipped weights, proteins of the human table's test partition, none of them "
        "nor any homolog trained on. Every row sees the same crops and flips. <b>CELL-E + encoder</b>: CELL-E on "
        "the frozen protein encoder's per-residue vectors; <b>CELL-E one-hot</b> and <b>no sequence</b>: the "
        "paper's ablations, trained on the same data for the same steps. <b>VQGAN ceiling</b>: the threshold "
        "tokenizer's own reconstruction of the true image, the best any CELL-E could do. <b>Sequence "
        "baseline</b>: ridge regression from amino-acid and dipeptide composition to the nucleus proportion, fitted on "
        "the training proteins (no image).</p>"
        + _table(["model"] + [label for _, label in _EVAL_METRICS], rows, cls="num")
    )
    page.add("evaluate", "CELL-E: held-out accuracy", body)


#: Shipped CELL-E weights whose recipes carry the held-out benchmark rows (``benchmarks/celle_eval.py``).
_BENCHMARKED = ("celle-tiny", "celle2-tiny-masked", "celle-tiny-onehot", "celle-tiny-noseq")


def _benchmark_section(page: _Page, metrics: dict[str, Any]) -> None:
    """The held-out benchmark of the shipped CELL-E models, as recorded in their recipes (not re-measured)."""
    from protloc.pretrained import read_recipe

    rows, record = [], {}
    n_prot = n_crops = None
    for name in _BENCHMARKED:
        try:
            held = read_recipe(name).get("held_out_test")
        except InputError:
            continue
        if not held:
            continue
        record[name] = held["row"]
        n_prot, n_crops, cols = held["proteins"], held["crops"], held["columns"]
        rows.append([name] + [_mean_sd(held["row"].get(k)) for k in cols])
    if not rows:
        return
    metrics["benchmark"] = {"over_proteins": record, "proteins": n_prot, "crops": n_crops}
    body = (
        f"<p>The shipped CELL-E models on {_esc(n_prot)} held-out proteins of the human table's test partition "
        f"({_esc(n_crops)} crops of a 4,400-protein proteome world; <code>benchmarks/celle_eval.py</code>, the numbers "
        "recorded in each model's <code>recipe.json</code> when it was packaged, not measured in this run). "
        "<b>Compartment agreement</b>: a CNN trained on real threshold crops of the train partition names the "
        "compartment of each image; the README gives its ceiling on real images and the other rows.</p>"
        + _table(["model"] + list(cols.values()), rows, cls="num")
    )
    page.add("benchmark", "CELL-E: shipped benchmark", body)


def _gallery_section(page: _Page, out: Path, metrics: dict[str, Any]) -> None:
    gal = _read_json(out / "gallery" / "gallery.json")
    if gal is None:
        return
    metrics["gallery"] = gal
    figs = []
    for item in gal.get("items", []):
        cap = (
            f"{item['protein_id']} ({item.get('label') or 'no label'}, {item['length']} aa): nuclear share "
            f"true {_fmt(item['nucleus_proportion_true'], 2)}, predicted {_fmt(item['nucleus_proportion_pred'], 2)}"
        )
        img = page.png(out / "gallery" / item["file"], item["file"], f"prediction for {item['protein_id']}")
        figs.append(f'<figure class="gallery-item">{img}<figcaption>{_esc(cap)}</figcaption></figure>')
    body = (
        "<p>Held-out proteins (never seen in training), one crop each: the nucleus image the model is given, "
        "the true thresholded protein image, the predicted threshold image (pixel-wise majority of "
        f"{_esc(gal.get('samples'))} samples) and the 2D probability map (Eq. 3) over the nucleus, with the "
        "nucleus outline.</p>" + f'<div id="gallery">{"".join(figs)}</div>'
    )
    page.add("gallery", "CELL-E: prediction gallery", body)


def _constructs_section(page: _Page, out: Path, metrics: dict[str, Any]) -> None:
    res = _read_json(out / "constructs" / "constructs.json")
    if res is None:
        return
    metrics["constructs"] = res
    rows = [
        [
            r["construct"],
            r["length"],
            _fmt(r["nucleus_proportion"]),
            "" if i == 0 else f"{r['delta']:+.3f} ± {_fmt(r['delta_sd'])}",
            "" if i == 0 else f"{r['above_reference']} / {r['images']}",
        ]
        for i, r in enumerate(res.get("rows", []))
    ]
    body = (
        "<p>The CELL-E paper's Fig. 4 experiment: GFP alone, GFP with a C-terminal nuclear localization signal "
        "(nucleoplasmin, N-Myc) and GFP with a random peptide, each predicted against the same held-out "
        f"nucleus images ({len(res.get('nuclei', []))}) with the same sampling noise, so differences come "
        "from the sequence. Lines join one nucleus image's constructs.</p>"
        + page.png(out / "constructs" / "constructs.png", "constructs.png", "GFP constructs", cls="fig half")
        + _table(["construct", "aa", "nucleus proportion", "Δ vs GFP (mean ± sd)", "above GFP"], rows, cls="num")
    )
    page.add("constructs", "CELL-E: GFP vs GFP + NLS", body)


def _screens_section(page: _Page, out: Path, metrics: dict[str, Any]) -> None:
    parts = []
    scan = out / "screens" / "nls_scan"
    att = out / "screens" / "attention"
    if (scan / "screen.png").is_file():
        metrics["nls_scan"] = _read_json(scan / "summary.json")
        parts.append(
            "<h3>NLS insertion scan</h3><p>The nucleoplasmin NLS inserted at several points along GFP; the bars "
            "are the change in predicted nucleus proportion from GFP (in-silico insertion screen).</p>"
            + page.png(scan / "screen.png", "nls_scan.png", "NLS insertion scan", cls="fig half")
        )
    if (att / "attention.png").is_file():
        metrics["attention"] = _read_json(att / "summary.json")
        parts.append(
            "<h3>Attention over residues</h3><p>For GFP + nucleoplasmin NLS: attention from the generated image "
            "patches where protein is present, versus background patches, back to each residue (CELL-E Fig. 6, "
            "attention rollout).</p>" + page.png(att / "attention.png", "attention.png", "residue attention")
        )
    if parts:
        page.add("screens", "CELL-E: in-silico screens", "".join(parts))


def _models_section(page: _Page, info: Mapping[str, Any]) -> None:
    rows = [[k, v] for k, v in info.get("models", {}).items()]
    stages = info.get("stages", {})
    srows = [[k, "reused" if v.get("reused") else _fmt(v.get("seconds"), 1)] for k, v in stages.items()]
    body = (
        f"<p>Weights: <b>{_esc(info.get('weights'))}</b>. Settings: <code>{_esc(json.dumps(info.get('settings')))}"
        "</code></p>"
        + _table(["model", "checkpoint"], rows)
        + "<h3>Stages (seconds)</h3>"
        + _table(["stage", "s"], srows)
    )
    page.add("models", "Models and run", body)


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#222;margin:0;background:#fafafa}
header{background:#1f3b57;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:21px} header p{margin:4px 0 0;color:#cfe}
nav{padding:6px 24px;background:#eef2f6;border-bottom:1px solid #d5dde5}
nav a{margin-right:14px;color:#1f3b57;text-decoration:none}
main{max-width:1150px;margin:0 auto;padding:8px 24px 40px}
section{background:#fff;border:1px solid #e2e2e2;border-radius:6px;padding:10px 18px 16px;margin:16px 0}
h2{font-size:18px;margin:6px 0 8px;color:#1f3b57} h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border-bottom:1px solid #e4e4e4;padding:4px 10px;text-align:left}
th{background:#f3f5f7} table.num td+td{text-align:right;font-variant-numeric:tabular-nums}
img.fig{max-width:100%;display:block;margin:8px 0} img.half{max-width:49%;display:inline-block;margin-right:1%}
img.small{max-width:520px}
iframe.atlas{width:100%;height:620px;border:1px solid #ccc;border-radius:4px}
#gallery{display:grid;grid-template-columns:1fr;gap:8px}
figure.gallery-item{margin:0;border-bottom:1px dashed #ddd;padding-bottom:6px}
figure.gallery-item img{max-width:100%}
figcaption{font-size:12px;color:#555}
#report-errors{display:none;background:#b00020;color:#fff;padding:8px 24px;white-space:pre-wrap}
.warn{background:#fff4e5;border:1px solid #f0b46a;padding:8px 12px;border-radius:4px}
.summary td:first-child{color:#555}
footer{color:#777;font-size:12px;text-align:center;margin:20px 0}
"""

# First script on the page: shows any later script error in a red banner instead of failing silently.
_ERROR_HOOK = """
(function(){
  var errors=[];
  function show(msg){errors.push(String(msg));var el=document.getElementById("report-errors");
    document.body&&document.body.setAttribute("data-errors",String(errors.length));
    if(el){el.style.display="block";el.textContent="This report hit a script error: "+errors.join("\\n");}}
  window.addEventListener("error",function(e){show(e.message||"resource failed to load")});
  window.addEventListener("unhandledrejection",function(e){show(e.reason)});
  window.__reportErrors=errors;
})();
"""

# Last script: record what rendered (read by the headless-browser test; harmless otherwise).
_RENDER_CHECK = """
window.addEventListener("load",function(){
  var body=document.body, imgs=document.querySelectorAll("#gallery img"), ok=0;
  for(var i=0;i<imgs.length;i++){if(imgs[i].complete&&imgs[i].naturalWidth>0){ok++;}}
  body.setAttribute("data-gallery",ok+"/"+imgs.length);
  var frame=document.getElementById("atlas-frame");
  function atlasState(){
    try{var a=frame&&frame.contentWindow&&frame.contentWindow.__atlas;
      return a&&a.ready?("rendered:"+a.n):"pending";}catch(e){return "error:"+e;}
  }
  body.setAttribute("data-atlas",frame?atlasState():"absent");
  if(frame){frame.addEventListener("load",function(){body.setAttribute("data-atlas",atlasState());});}
  if(!body.hasAttribute("data-errors")){body.setAttribute("data-errors","0");}
});
"""


def _summary_rows(metrics: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    a = metrics.get("atlas")
    if a:
        rows.append(["cytoself clustering score (test crops)", _fmt(a.get("clustering_score"))])
        rows.append(["cytoself k-NN localization macro-F1", _fmt(a.get("knn_macro_f1"))])
    ev = metrics.get("evaluate", {}).get("over_proteins", {})
    for name, vals in ev.items():
        npa = vals.get("nucleus_proportion_accuracy")
        if npa:
            rows.append([f"{name}: nucleus-proportion accuracy", _mean_sd(npa)])
    c = metrics.get("constructs", {}).get("rows", [])
    for r in c[1:]:
        up = f"{r['above_reference']}/{r['images']} nuclei up"
        rows.append([f"{r['construct']}: Δ nucleus proportion vs GFP", f"{r['delta']:+.3f} ({up})"])
    return rows


def build_report(out: str | os.PathLike, info: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``out/report`` from the stage folders of a demo run.

    Parameters
    ----------
    out
        The demo folder (``atlas/``, ``spectrum/``, ``interpret/``, ``evaluate/``, ``gallery/``,
        ``constructs/``, ``screens/``; missing stages are left out of the page).
    info
        Run information: ``settings``, ``models``, ``weights``, ``mismatch``, ``query_protein``, ``stages``.

    Returns
    -------
    dict
        The content of ``report/metrics.json``.
    """
    out = Path(out)
    metrics: dict[str, Any] = {"protloc": __version__, **{k: v for k, v in info.items()}}
    with atomic_dir(out / "report") as tmp:
        page = _Page(tmp)
        _atlas_section(page, out, metrics)
        _spectrum_section(page, out, metrics, info.get("query_protein"))
        _gallery_section(page, out, metrics)
        _evaluate_section(page, out, metrics)
        _benchmark_section(page, metrics)
        _constructs_section(page, out, metrics)
        _screens_section(page, out, metrics)
        _models_section(page, info)
        if not page.sections:
            raise InputError("nothing to report: no finished demo stages here", path=out)
        summary = _summary_rows(metrics)
        metrics["summary"] = dict(summary)
        warn = ""
        if info.get("mismatch"):
            warn = (
                '<p class="warn">These results use the shipped weights on a world other than the one they were '
                "trained on: some “held-out” proteins may have been seen in training.</p>"
            )
        nav = "".join(
            f'<a href="#{a}">{t}</a>'
            for a, t in (
                ("atlas", "atlas"),
                ("spectra", "spectra"),
                ("gallery", "gallery"),
                ("evaluate", "accuracy"),
                ("constructs", "GFP + NLS"),
                ("screens", "screens"),
                ("models", "run"),
            )
        )
        when = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        doc = (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>protloc demo report</title><style>{_CSS}</style><script>{_ERROR_HOOK}</script></head>"
            '<body><div id="report-errors"></div>'
            "<header><h1>protloc demo report</h1><p>cytoself localization embeddings and CELL-E localization "
            f"prediction on the reference cell world &middot; weights: {_esc(info.get('weights'))} &middot; "
            f"{_esc(when)}</p></header><nav>{nav}</nav><main>{warn}"
            '<section id="summary"><h2>Summary</h2>'
            + _table(["result", "value"], summary, cls="summary num")
            + "</section>"
            + "".join(page.sections)
            + f"<footer>protloc {_esc(__version__)} &middot; self-contained page: no network needed</footer></main>"
            f"<script>{_RENDER_CHECK}</script></body></html>\n"
        )
        atomic_write_text(tmp / "index.html", doc)
        metrics = json_ready(metrics)
        atomic_write_json(tmp / "metrics.json", metrics)
    logger.info("report written to %s", out / "report" / "index.html")
    return metrics
