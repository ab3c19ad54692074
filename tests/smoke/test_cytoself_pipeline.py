"""cytoself end to end through the command line: train -> embed -> atlas -> spectrum -> interpret."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from protloc.cli import main
from protloc.data.io import CropStore
from protloc.eval.embed import read_obsm

S = 32


def _blob_store(path: Path) -> Path:
    """6 proteins in 3 localization classes; each class a distinct pattern; train/val/test fields."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:S, :S]
    r = np.hypot(yy - S / 2, xx - S / 2)
    patterns = {
        "nuclear": (r < 8).astype(np.float32),
        "rim": ((r > 8) & (r < 11)).astype(np.float32),
        "diffuse": (r >= 11).astype(np.float32),
    }
    labels = ["nuclear", "nuclear", "rim", "rim", "diffuse", "diffuse"]
    rows, prot = [], []
    for p, lab in enumerate(labels):
        for i in range(24):
            split = ("train", "train", "val", "test")[i % 4]
            rows.append({"protein_id": f"P{p}", "fov_id": f"P{p}_F{i % 4}", "split": split, "label": lab})
            prot.append(np.clip(patterns[lab] * rng.uniform(0.5, 1) + rng.normal(0, 0.05, (S, S)), 0, 1))
    protein = np.stack(prot).astype(np.float32)
    dist = np.broadcast_to(np.clip((8 - r) / 8, -1, 1), protein.shape).astype(np.float32)
    with CropStore.create(
        path, channels={"protein": "float16", "nucleus": "float16", "nucleus_distance": "float16"}, size=S, chunk=16
    ) as w:
        w.append(
            {"protein": protein, "nucleus": (dist > 0).astype(np.float32), "nucleus_distance": dist}, pd.DataFrame(rows)
        )
    return path


def test_cytoself_commands(tmp_path, capsys):
    store = _blob_store(tmp_path / "cytoself.zarr")
    run = tmp_path / "run"
    rc = main(
        [
            "-q",
            "train",
            "cytoself",
            "--store",
            str(store),
            "--out",
            str(run),
            "--set",
            f"model.input_size={S}",
            "--set",
            "schedule.max_steps=3",
            "--set",
            "schedule.eval_every=3",
            "--set",
            "data.batch_size=8",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert (run / "best" / "model.safetensors").is_file()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(m["split"] == "val" for m in metrics)

    emb = tmp_path / "emb.h5ad"
    assert (
        main(["-q", "embed", "--checkpoint", str(run), "--store", str(store), "--out", str(emb), "--batch-size", "7"])
        == 0
    )
    adata = ad.read_h5ad(emb)
    n = len(CropStore.open(store))
    assert adata.n_obs == n
    assert adata.obsm["global"].shape[0] == n and adata.obsm["local_indices"].dtype == np.int16
    assert np.isfinite(adata.obsm["global"]).all()
    assert set(adata.obs["label"]) == {"nuclear", "rim", "diffuse"}
    # eval mode: a crop's encoding does not depend on its batch (the reference's defect)
    emb2 = tmp_path / "emb2.h5ad"
    assert (
        main(
            [
                "-q",
                "embed",
                "--checkpoint",
                str(run),
                "--store",
                str(store),
                "--out",
                str(emb2),
                "--batch-size",
                "64",
                "--split",
                "test",
            ]
        )
        == 0
    )
    test_rows = np.flatnonzero(adata.obs["split"].to_numpy() == "test")
    np.testing.assert_allclose(read_obsm(emb2, "global"), adata.obsm["global"][test_rows], rtol=0, atol=1e-5)
    # refusing to overwrite
    assert main(["-q", "embed", "--checkpoint", str(run), "--store", str(store), "--out", str(emb)]) == 2

    out = tmp_path / "atlas"
    assert main(["-q", "atlas", "--embeddings", str(emb), "--out", str(out), "--store", str(store)]) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert scores["n_crops"] == len(test_rows)
    assert {"atlas.png", "atlas.html", "umap.csv", "scores.json"} <= {p.name for p in out.iterdir()}
    html = (out / "atlas.html").read_text()
    assert "data:image/png;base64" in html and "https://" not in html

    out = tmp_path / "spectrum"
    assert (
        main(["-q", "spectrum", "--embeddings", str(emb), "--out", str(out), "--query", "P0", "--clusters", "3"]) == 0
    )
    assert (out / "spectrum_heatmap.png").is_file() and (out / "families_P0.csv").is_file()
    spectra = pd.read_csv(out / "spectra.csv", index_col=0)
    np.testing.assert_allclose(spectra.sum(axis=1), 1.0, atol=1e-6)
    before = sorted(p.name for p in out.iterdir())
    assert main(["-q", "spectrum", "--embeddings", str(emb), "--out", str(out), "--query", "NOPE"]) == 2
    assert main(["-q", "spectrum", "--embeddings", str(emb), "--out", str(out), "--query", "P0"]) == 2  # exists
    assert sorted(p.name for p in out.iterdir()) == before  # the earlier result is untouched
    assert main(["-q", "spectrum", "--embeddings", str(emb), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "families_P0.csv").exists()  # replaced as a whole

    out = tmp_path / "interpret"
    assert (
        main(
            [
                "-q",
                "interpret",
                "--checkpoint",
                str(run),
                "--store",
                str(store),
                "--out",
                str(out),
                "--protein",
                "P2",
                "--top",
                "2",
                "--crops",
                "2",
            ]
        )
        == 0
    )
    summary = json.loads((out / "feature_zeroing_P2.json").read_text())
    assert 1 <= len(summary["codes"]) <= 2 and (out / "feature_zeroing_P2.png").is_file()
    assert len(summary["mean_abs_difference"]) == len(summary["codes"])
