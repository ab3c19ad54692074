"""Atlas and spectrum figures, and the self-contained interactive HTML atlas."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from protloc.analysis.spectrum import bicluster, consensus_spectra, family_correlation
from protloc.plotting.atlas import atlas_html, category_palette, plot_atlas
from protloc.plotting.spectrum import (
    plot_correlation_heatmap,
    plot_family_correlation,
    plot_feature_spectrum,
    plot_spectrum_heatmap,
)


def _points(n: int = 120, seed: int = 0):
    rng = np.random.default_rng(seed)
    xy = rng.normal(size=(n, 2))
    labels = np.array(["Golgi", "ER", "", "nucleolus"], dtype=object)[np.arange(n) % 4]
    obs = pd.DataFrame(
        {
            "protein_id": [f"P{i // 6}" for i in range(n)],
            "label": labels,
            "fov_id": [f"fov{i // 10}" for i in range(n)],
            "split": "test",
        }
    )
    return xy, obs


def _adata():
    import anndata as ad

    xy, obs = _points()
    obs.index = obs.index.astype(str)
    a = ad.AnnData(X=np.zeros((len(obs), 0), dtype=np.float32), obs=obs)
    xy[:10] = np.nan  # crops outside the atlas split
    a.obsm["X_umap"] = xy
    return a


def test_plot_atlas_from_adata_and_from_arrays():
    fig = plot_atlas(_adata(), title="atlas")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("Golgi (") for t in legend) and any(t.startswith("other (") for t in legend)
    assert sum(len(c.get_offsets()) for c in ax.collections) == 110  # NaN rows skipped

    xy, obs = _points()
    fig2 = Figure()
    ax2 = fig2.add_subplot()
    assert plot_atlas(xy, labels=obs["label"], ax=ax2, palette={"ER": "red"}, legend=False) is fig2
    # a continuous colour column gets a colour bar
    fig3 = plot_atlas(xy, labels=np.linspace(0, 1, len(xy)))
    assert len(fig3.axes) == 2
    with pytest.raises(ValueError, match="labels"):
        plot_atlas(xy)


def test_category_palette():
    p = category_palette(["a", "b", "c"], {"b": "red"})
    assert p["b"] == "#ff0000" and len(set(p.values())) == 3
    assert len(set(category_palette([str(i) for i in range(70)]).values())) == 70


def test_atlas_html_is_self_contained_and_escaped(tmp_path):
    xy, obs = _points()
    obs.loc[0, "protein_id"] = "</script><script>alert(1)</script>"
    thumbs = [None] * len(xy)
    thumbs[1] = np.random.default_rng(0).random((40, 40, 3))
    thumbs[2] = np.arange(100 * 100, dtype=np.uint16).reshape(100, 100)
    out = atlas_html(xy, obs, path=tmp_path / "sub" / "atlas.html", thumbnails=thumbs, title="A & B <atlas>")
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert "<title>A &amp; B &lt;atlas&gt;</title>" in text
    # no external resources, no network at view time
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text)
    assert "http://" not in text and "https://" not in text
    # the injected string cannot close the script element
    assert text.count("</script>") == 2
    data = text.split('<script id="atlas-data" type="application/json">')[1].split("</script>")[0]
    payload = json.loads(data)
    assert len(payload["x"]) == len(xy) and len(payload["c"]) == len(xy)
    assert set(payload["categories"]) == {"ER", "Golgi", "nucleolus", ""}
    assert sorted(payload["order"]) == list(range(len(xy)))
    assert payload["order"][: len(xy) // 4] == list(range(2, len(xy), 4))  # unlabelled drawn first
    names = [f["name"] for f in payload["fields"]]
    assert names == ["protein_id", "label", "fov_id", "split"]
    prot = payload["fields"][0]
    assert prot["values"][prot["codes"][0]] == "</script><script>alert(1)</script>"
    assert set(payload["thumbs"]) == {"1", "2"}
    assert payload["thumbs"]["1"].startswith("data:image/png;base64,")
    # NaN coordinates are skipped together with their thumbnails
    xy2 = xy.copy()
    xy2[1] = np.nan
    text2 = atlas_html(xy2, obs, path=tmp_path / "b.html", thumbnails=thumbs).read_text()
    data2 = json.loads(text2.split('type="application/json">')[1].split("</script>")[0])
    assert len(data2["x"]) == len(xy) - 1 and set(data2["thumbs"]) == {"1"}  # old point 2 is now 1


def test_spectrum_plots():
    rng = np.random.default_rng(0)
    k = 40
    rows = {}
    labels = {}
    for fam, lo in (("ER", 0), ("mito", 15)):
        for j in range(5):
            v = np.zeros(k)
            v[lo : lo + 15] = rng.random(15) + 0.2
            rows[f"{fam}{j}"] = v / v.sum()
            labels[f"{fam}{j}"] = fam
    spectra = pd.DataFrame(rows).T
    order = bicluster(spectra, n_clusters=4)
    for fig in (
        plot_spectrum_heatmap(spectra, order),
        plot_spectrum_heatmap(spectra, order, max_proteins=3, scale="log", show_unused=True),
        plot_correlation_heatmap(spectra, order),
        plot_feature_spectrum(spectra, "ER1", order),
        plot_feature_spectrum(spectra, spectra.loc["mito2"].to_numpy(), order, show_unused=True),
    ):
        assert isinstance(fig, Figure)
    heat = plot_spectrum_heatmap(spectra, order)
    bar_texts = [t.get_text() for a in heat.axes[0].child_axes for t in a.texts]
    assert "i" in bar_texts
    r = family_correlation("ER1", consensus_spectra(spectra, labels), spectra=spectra)
    fig = plot_family_correlation(r)
    assert isinstance(fig, Figure)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()][-1] == "ER"
