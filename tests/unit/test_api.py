"""The Python API (protloc.api): keyword-only, AnnData / DataFrame results, shipped models by default."""

from __future__ import annotations

import inspect
from pathlib import Path

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

import protloc.api as pla
from protloc.commands.predict import run_predict
from protloc.data.io import CropStore
from protloc.errors import ConfigError, InputError
from protloc.eval.predict import SamplingConfig
from protloc.pretrained import resolve_checkpoint

matplotlib.use("Agg")

GFP_NLS = "MSKGEELFTGVVPILVELDGDVNGHKFSVSGEGEGDATYGKLTLKFICTTGKLPVPWPTLVTTFSYGVQCFSRYPDHMKRHDFFKSAMPEGYVQERTIFFKDDGNYKTRAEVKFEGDTLVNRIELKGIDFKEDGNILGHKLEYNYNSHNVYIMADKQKNGIKVNFKIRHNIEDGSVQLADHYQQNTPIGDGPVLLPDNHYLSTQSALSKDPNEKRDHMVLLEFVTAAGITHGMDELYKKRPAATKKAGQAKKKK"  # noqa: E501


def _cytoself_store(path: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:100, :100]
    dist = np.clip((np.hypot(yy - 50, xx - 50) - 20) / 30, -1, 1).astype(np.float32)
    protein = rng.random((n, 100, 100)).astype(np.float32) * (1 - np.abs(dist))[None]
    obs = pd.DataFrame(
        {
            "protein_id": [f"P{i % 3}" for i in range(n)],
            "fov_id": [f"F{i % 4}" for i in range(n)],
            "split": ["test"] * n,
            "label": ["nucleoplasm", "cytosol", "er"] * (n // 3),
        }
    )
    with CropStore.create(path, channels={"protein": "float32", "nucleus_distance": "float32"}, size=100) as w:
        w.append({"protein": protein, "nucleus_distance": np.broadcast_to(dist, (n, 100, 100)).copy()}, obs)
    return path


def test_every_public_function_takes_keyword_only_options() -> None:
    for name in pla.__all__:
        fn = getattr(pla, name)
        # re-exported lower-layer functions keep their own signatures
        skip = name.startswith("plot_") or name in (
            "list_pretrained",
            "construct_experiment",
            "import_cytoself_crops",
            "import_celle_manifest",
        )
        if skip or not inspect.isfunction(fn):
            continue
        params = list(inspect.signature(fn).parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        assert len(positional) <= 1, (name, [p.name for p in positional])
        assert fn.__doc__, name


def test_predict_returns_anndata_and_matches_the_command(tmp_path: Path) -> None:
    seqs = {"GFP_NLS": GFP_NLS, "short": "MKTAYIAKQRQISFVKSHFSRQ"}
    adata = pla.predict(seqs, samples=2, seed=3)
    assert isinstance(adata, ad.AnnData) and list(adata.obs_names) == ["GFP_NLS", "short"]
    prob = adata.obsm["probability"]
    assert prob.shape == (2, 64, 64) and np.allclose(prob.reshape(2, -1).sum(1), 1.0, atol=1e-4)
    assert set(np.unique(adata.obsm["threshold"])) <= {0, 1}
    assert adata.obs["length"].tolist() == [len(GFP_NLS), 22]
    assert ((adata.obs["nucleus_proportion"] >= 0) & (adata.obs["nucleus_proportion"] <= 1)).all()
    adata.write_h5ad(tmp_path / "pred.h5ad")  # the result is a valid .h5ad
    assert ad.read_h5ad(tmp_path / "pred.h5ad").obsm["probability"].shape == (2, 64, 64)
    # same numbers as `protloc predict` with the shipped model (same seed and batch)
    summary = run_predict(
        checkpoint=resolve_checkpoint("pretrained:celle-tiny"),
        out=tmp_path / "cmd",
        sequences=seqs,
        sampling=SamplingConfig(samples=2, seed=3),
        progress=False,
    )
    cmd = [s["nucleus_proportion"] for s in summary["sequences"]]
    np.testing.assert_allclose(adata.obs["nucleus_proportion"].to_numpy(), cmd, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "cmd" / "GFP_NLS_probability.npy"), prob[0], atol=1e-6)


def test_predict_rejects_bad_residues_by_name() -> None:
    with pytest.raises(InputError, match="bad"):
        pla.predict({"bad": "MKT1AY"})


def test_screen_returns_a_table_with_the_wild_type_first() -> None:
    df = pla.screen("MKTAYIAKQRQISFVKSHFSRQ", mode="insert", peptides={"NLS": "PKKKRKV"}, at=["start", "end"])
    assert df["name"].tolist()[0] == "wild type" and len(df) == 3
    assert df["delta"].iloc[0] == 0.0
    assert isinstance(pla.plot_screen(df), Figure)
    with pytest.raises(ConfigError):
        pla.screen("MKT", mode="attention")


def test_embed_and_spectra_on_a_crop_store(tmp_path: Path) -> None:
    store = _cytoself_store(tmp_path / "cytoself.zarr")
    adata = pla.embed(store, progress=False)  # the shipped cytoself
    assert adata.n_obs == 12 and adata.obsm["global"].shape[0] == 12
    assert np.isfinite(adata.obsm["global"]).all()
    kept = pla.embed(store, out=tmp_path / "emb.h5ad", progress=False)
    assert (tmp_path / "emb.h5ad").is_file()
    np.testing.assert_array_equal(kept.obsm["local_indices"], adata.obsm["local_indices"])
    spectra, order = pla.spectra(adata)
    assert list(spectra.index) == ["P0", "P1", "P2"]
    np.testing.assert_allclose(spectra.sum(axis=1), 1.0, atol=1e-6)
    assert isinstance(pla.plot_spectrum_heatmap(spectra, order), Figure)
    images, result = pla.feature_zeroing(store, protein="P1", n_crops=2, top=2)
    assert images.shape == (2, 100, 100) and len(result.codes) == 2
    assert isinstance(pla.plot_feature_zeroing(images, result), Figure)


def test_plot_functions_draw_on_a_given_axes() -> None:
    fig = Figure()
    ax = fig.subplots()
    nuc = np.random.default_rng(0).random((16, 16))
    prob = np.full((16, 16), 1 / 256)
    assert pla.plot_prediction(nuc, prob, ax=ax) is fig


def test_train_rejects_an_unknown_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model must be"):
        pla.train("resnet", store=tmp_path / "s.zarr", out=tmp_path / "run")
