"""Sequence-only localization with the protein encoder (protloc.eval.localize, protloc.commands.localize).

A tiny randomly initialised encoder stands in for a trained one: the tests check the arithmetic (integrated
gradients' completeness, positions of clipped sequences, batching), the inputs and the outputs, not accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

import protloc.api as pla
from protloc.commands.localize import localize_inputs, localize_sequences, run_localize
from protloc.data.proteome import PRESENCE_NAMES
from protloc.data.sequences import clip_residues
from protloc.data.world.assets import load_engineered_records
from protloc.data.world.compartments import COMPARTMENTS
from protloc.errors import ConfigError, InputError
from protloc.eval.localize import (
    NUCLEUS,
    checkpoint_thresholds,
    clipped_positions,
    construct_report,
    distribution_probabilities,
    encoder_info,
    encoder_outputs,
    integrated_gradients,
    load_encoder,
    peak_window,
    presence_probabilities,
    residue_importance,
)
from protloc.models.checkpoint import save_checkpoint
from protloc.models.encoder import EncoderConfig, ProteinEncoder
from protloc.plotting.localize import plot_importance

matplotlib.use("Agg")

SEQS = {
    "short": "MKTAYIAKQRQISFVKSHFSRQ",
    "nls": "MSDKPAAKRVKLDGGSAAW",
    "long": "ACDEFGHIKLMNPQRSTVWY" * 3,
    "tiny": "MK",
}


def _model(max_residues: int = 1000, seed: int = 0) -> ProteinEncoder:
    torch.manual_seed(seed)
    return ProteinEncoder(dataclasses.replace(EncoderConfig.tiny(), max_residues=max_residues)).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny encoder checkpoint folder (random weights)."""
    model = _model()
    return save_checkpoint(tmp_path_factory.mktemp("enc") / "ckpt", model=model, config=model.config, extra={"step": 7})


@pytest.fixture(scope="module")
def short_ckpt(tmp_path_factory) -> Path:
    """A tiny encoder that clips at 20 residues (keeps 10 + 10), as a run folder with best/."""
    model = _model(max_residues=20, seed=1)
    run = tmp_path_factory.mktemp("enc_short") / "run"
    save_checkpoint(run / "best", model=model, config=model.config)
    return run


# ------------------------------------------------------------------------------------------- loading
def test_load_encoder_accepts_checkpoint_and_run_folders(ckpt: Path, short_ckpt: Path, tmp_path: Path) -> None:
    model, config = load_encoder(ckpt)
    assert isinstance(model, ProteinEncoder) and not model.training and config == EncoderConfig.tiny()
    model, config = load_encoder(short_ckpt)  # run folder: best/
    assert config.max_residues == 20
    with pytest.raises(InputError, match="protein encoder checkpoint"):
        load_encoder(tmp_path / "missing")
    with pytest.raises(InputError, match="no shipped model"):
        load_encoder("pretrained:no-such-model")


def test_thresholds_come_from_the_checkpoint_else_default(ckpt: Path, tmp_path: Path) -> None:
    thresholds, source = checkpoint_thresholds(ckpt)
    assert source == "default 0.5" and thresholds == dict.fromkeys(PRESENCE_NAMES, 0.5)
    model = _model()
    with_extra = save_checkpoint(
        tmp_path / "extra", model=model, config=model.config, extra={"thresholds": {"nucleus": 0.3, "er": 0.62}}
    )
    thresholds, source = checkpoint_thresholds(with_extra)
    assert thresholds["nucleus"] == 0.3 and thresholds["er"] == 0.62 and thresholds["cytosol"] == 0.5
    assert source.startswith("config.json extra; 0.5 for")
    recipe = save_checkpoint(tmp_path / "recipe", model=model, config=model.config)
    (recipe / "recipe.json").write_text(json.dumps({"validation": {"thresholds": [0.4] * 13}}))
    thresholds, source = checkpoint_thresholds(recipe)
    assert source == "recipe.json validation" and set(thresholds.values()) == {0.4}
    (recipe / "recipe.json").write_text(json.dumps({"thresholds": {"nucleus": 1.5}}))
    with pytest.raises(InputError, match="threshold of 'nucleus'"):
        checkpoint_thresholds(recipe)
    info = encoder_info(ckpt)
    assert len(info["sha256"]) == 64 and info["step"] == 7 and info["name"] == str(ckpt.resolve())


# ----------------------------------------------------------------------------------------- inference
def test_probabilities_are_in_range_and_independent_of_batching() -> None:
    model = _model()
    seqs = list(SEQS.values())
    out = encoder_outputs(model, seqs, batch_size=1)
    p, d = out["presence"], out["distribution"]
    assert p.shape == (4, len(PRESENCE_NAMES)) and d.shape == (4, len(COMPARTMENTS))
    assert out["pooled"].shape == (4, 2 * model.config.dim) and not out["clipped"].any()
    assert ((p >= 0) & (p <= 1)).all() and np.allclose(d.sum(1), 1.0, atol=1e-5)
    # another order, batch size: same rows (length-sorted batching, padding-invariant encoder)
    order = [2, 0, 3, 1]
    q = presence_probabilities(model, [seqs[i] for i in order], batch_size=3)
    np.testing.assert_allclose(q, p[order], atol=1e-5)
    np.testing.assert_allclose(distribution_probabilities(model, seqs, batch_size=4), d, atol=1e-5)
    with pytest.raises(InputError, match=r"invalid residue 'J' at position 3"):
        presence_probabilities(model, ["MKJ"])
    with pytest.raises(ConfigError, match="batch_size"):
        presence_probabilities(model, seqs, batch_size=0)


def test_long_sequences_are_clipped_to_both_ends() -> None:
    model = _model(max_residues=20)
    long = "M" + "A" * 12 + "K" * 10 + "W" * 12  # 35 residues
    out = encoder_outputs(model, [long, clip_residues(long, 20), "MKT"])
    assert out["clipped"].tolist() == [True, False, False]
    np.testing.assert_allclose(out["presence"][0], out["presence"][1], atol=1e-6)


# ---------------------------------------------------------------------------------------- importance
def test_integrated_gradients_are_complete() -> None:
    model = _model()
    imp = integrated_gradients(model, SEQS["long"], ["nucleus", 4], steps=64)
    assert imp.targets == ("nucleus", "cytosol") and imp.attributions.shape == (2, len(SEQS["long"]))
    assert np.isfinite(imp.attributions).all()
    diff = imp.logits - imp.baseline_logits
    total = imp.attributions.sum(1)
    # sum of attributions = logit(x) - logit(baseline), up to the midpoint rule's error
    np.testing.assert_allclose(total, diff, rtol=0.02, atol=2e-4)
    assert np.abs(imp.gap).max() <= 0.02 * np.abs(diff).max() + 2e-4
    # the logits are the model's own
    with torch.no_grad():
        from protloc.data.sequences import Tokenizer

        ids = torch.from_numpy(Tokenizer().encode(SEQS["long"]))[None]
        logits = model(ids, torch.ones_like(ids, dtype=torch.bool))["presence"][0]
    np.testing.assert_allclose(imp.logits, logits[[NUCLEUS, 4]].numpy(), atol=1e-5)
    # one target at a time gives the same attributions (the steps' gradients are independent)
    alone = integrated_gradients(model, SEQS["long"], [NUCLEUS], steps=64)
    np.testing.assert_allclose(alone.attributions[0], imp.attributions[0], atol=1e-6)
    with pytest.raises(ConfigError, match="unknown presence output"):
        integrated_gradients(model, "MKT", ["lysosome"])
    with pytest.raises(ConfigError, match="steps"):
        integrated_gradients(model, "MKT", ["nucleus"], steps=0)


def test_clipped_positions_map_back_to_the_original_sequence() -> None:
    assert clipped_positions(5, 10).tolist() == [1, 2, 3, 4, 5]
    pos = clipped_positions(1200, 1000)
    assert len(pos) == 1000 and pos[499] == 500 and pos[500] == 701 and pos[-1] == 1200
    assert clipped_positions(7, 5).tolist() == [1, 2, 3, 6, 7]  # odd: 3 from the start, 2 from the end
    model = _model(max_residues=20)
    long = "MSKAAKRVKLDAAAGGGGGGGGPPPKKRKVEDW"  # 33 residues: positions 11..23 unseen
    imp = integrated_gradients(model, long, ["nucleus"], steps=16)
    track = imp.attributions[0]
    assert imp.clipped and track.shape == (33,)
    assert np.isnan(track[10:23]).all() and np.isfinite(track[:10]).all() and np.isfinite(track[23:]).all()
    # the scores are those of the clipped sequence, placed at the original positions
    direct = integrated_gradients(model, clip_residues(long, 20), ["nucleus"], steps=16).attributions[0]
    np.testing.assert_allclose(track[clipped_positions(33, 20) - 1], direct, atol=1e-6)
    np.testing.assert_allclose(np.nansum(track), imp.logits[0] - imp.baseline_logits[0], rtol=0.05, atol=1e-3)


def test_residue_importance_explains_nucleus_and_the_top_compartment() -> None:
    model = _model()
    res = residue_importance(model, SEQS["nls"], steps=8)
    p = presence_probabilities(model, [SEQS["nls"]])[0]
    assert res["top_compartment"] == COMPARTMENTS[int(np.argmax(p[:12]))]
    assert res["nucleus"].shape == res["top"].shape == (len(SEQS["nls"]),)
    assert res["importance"].targets == ("nucleus", res["top_compartment"])


def test_peak_window() -> None:
    track = np.array([0.0, 0.1, 0.9, 1.2, 0.8, -0.2, 0.0, 0.5, 0.5])
    assert peak_window(track, width=3) == (3, 5, 2.9)
    assert peak_window(track, width=1).start == 4
    assert peak_window(track[:2], width=9) == (1, 2, 0.1)  # shorter than the window: one window
    # windows touching NaN are skipped, even when NaN would look like 0
    gapped = np.array([0.1, 0.2, np.nan, np.nan, 0.3, -0.1, 0.05])
    assert peak_window(gapped, width=2) == (1, 2, 0.3)
    assert peak_window([-1.0, -0.5, -2.0], width=1).start == 2  # all negative: the least negative
    with pytest.raises(InputError, match="free of NaN"):
        peak_window([np.nan, 1.0, np.nan], width=2)
    with pytest.raises(InputError, match="empty"):
        peak_window([], width=3)
    with pytest.raises(ConfigError, match="width"):
        peak_window(track, width=0)


def test_construct_report_on_the_engineered_constructs() -> None:
    model = _model()
    report = construct_report(model, steps=2)
    records = load_engineered_records()
    assert list(report) == [r["id"] for r in records]
    gfp = report["GFP"]
    assert gfp["appended"] is None and gfp["peak"]["in_appended"] is None and gfp["length"] == 238
    nls = report["GFP_NLS_nucleoplasmin"]
    assert nls["appended"] == [239, 254] and nls["peptide"] == "KRPAATKKAGQAKKKK"
    assert isinstance(nls["peak"]["in_appended"], bool)
    assert report["TOP1"]["appended"] is None
    for c in report.values():
        assert 0.0 <= c["nuclear_probability"] <= 1.0
        peak = c["peak"]
        assert 1 <= peak["start"] <= peak["end"] <= c["length"] and len(peak["residues"]) == 9
        if c["appended"]:
            assert peak["in_appended"] == (peak["end"] >= 239)


# -------------------------------------------------------------------------------------------- plotting
def test_plot_importance() -> None:
    seq = SEQS["short"]
    track = np.linspace(-1, 1, len(seq))
    fig = plot_importance(seq, track, title="short", peak=peak_window(track, 5))
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(seq)  # letters for short sequences
    assert any("18-22" in t.get_text() for t in ax.texts)
    long = "A" * 120
    gapped = np.r_[np.ones(50), np.full(20, np.nan), -np.ones(50)]
    fig = plot_importance(long, gapped, title="gapped")
    assert any("clipped" in t.get_text() for t in fig.axes[0].texts)
    with pytest.raises(InputError, match="3 values for a sequence of 22"):
        plot_importance(seq, [1.0, 2.0, 3.0], title="bad")
    with pytest.raises(InputError, match="outside the sequence"):
        plot_importance(seq, track, title="bad", peak=(20, 30))


# ---------------------------------------------------------------------------------------------- command
def test_localize_sequences_builds_anndata_and_importance(ckpt: Path) -> None:
    adata, table = localize_sequences(SEQS, checkpoint=ckpt, ig_steps=4, batch_size=2)
    assert list(adata.obs_names) == list(SEQS)
    obs = adata.obs
    assert obs["length"].tolist() == [len(s) for s in SEQS.values()] and not obs["clipped"].any()
    for c in COMPARTMENTS:
        assert obs[f"p_{c}"].between(0, 1).all() and obs[f"call_{c}"].dtype == bool
        assert (obs[f"call_{c}"] == (obs[f"p_{c}"] >= 0.5)).all()
    assert (obs["nuclear"] == (obs["p_nucleus"] >= 0.5)).all()
    np.testing.assert_allclose(adata.obsm["presence"][:, NUCLEUS], obs["p_nucleus"], atol=1e-7)
    np.testing.assert_allclose(adata.obsm["distribution"].sum(1), 1.0, atol=1e-5)
    assert adata.obsm["X_encoder"].shape == (4, 2 * EncoderConfig.tiny().dim)
    uns = adata.uns["localize"]
    assert uns["threshold_source"] == "default 0.5" and uns["presence_names"] == list(PRESENCE_NAMES)
    assert uns["step"] == 7 and len(uns["sha256"]) == 64
    assert list(table.columns) == [
        "protein",
        "position",
        "residue",
        "importance_nucleus",
        "importance_top",
        "top_compartment",
    ]
    assert len(table) == sum(len(s) for s in SEQS.values())
    one = table[table["protein"] == "short"]
    assert one["position"].tolist() == list(range(1, 23)) and "".join(one["residue"]) == SEQS["short"]
    assert (one["top_compartment"] == obs.loc["short", "top_compartment"]).all()
    # no importance: an empty table with the same columns
    adata2, empty = localize_sequences(SEQS, checkpoint=ckpt, importance=False)
    assert empty.empty and list(empty.columns) == list(table.columns) and "nucleus_peak" not in adata2.obs
    np.testing.assert_allclose(adata2.obsm["presence"], adata.obsm["presence"], atol=1e-5)
    # the API is the same computation
    adata3, _ = pla.localize(SEQS, checkpoint=ckpt, importance=False)
    np.testing.assert_allclose(adata3.obsm["presence"], adata.obsm["presence"], atol=1e-5)


def test_localize_clips_long_sequences_and_says_so(short_ckpt: Path, caplog) -> None:
    seqs = {"long": "M" + "A" * 30 + "W" * 9, "short": "MKTAYIAKQ"}  # 40 residues: 10 + 10 kept
    with caplog.at_level(logging.INFO, logger="protloc.commands.localize"):
        adata, table = localize_sequences(seqs, checkpoint=short_ckpt, ig_steps=2)
    assert adata.obs["clipped"].tolist() == [True, False]
    assert "long has 40 residues" in caplog.text
    rows = table[table["protein"] == "long"]
    assert rows["position"].tolist() == [*range(1, 11), *range(31, 41)]
    assert "".join(rows["residue"]) == clip_residues(seqs["long"], 20)
    start, end = (int(v) for v in adata.obs.loc["long", "nucleus_peak"].split("-"))
    assert end - start == 8


def test_inputs_sequences_fasta_and_tables(tmp_path: Path) -> None:
    assert localize_inputs("MKTAYI") == ([("query", "MKTAYI")], None)
    fasta = tmp_path / "q.fasta"
    fasta.write_text(">a\nMKT\n>b desc\nPKKKRKV\n")
    assert localize_inputs(fasta) == ([("a", "MKT"), ("b", "PKKKRKV")], fasta)
    assert localize_inputs(str(fasta))[0][1] == ("b", "PKKKRKV")
    table = tmp_path / "q.tsv"
    pd.DataFrame({"protein_id": ["x", "y"], "sequence": ["MKT", "acd"]}).to_csv(table, sep="\t", index=False)
    assert localize_inputs(table)[0] == [("x", "MKT"), ("y", "ACD")]
    with pytest.raises(InputError, match=r"sequence 'b': invalid residue 'J' at position 4"):
        localize_inputs({"a": "MKT", "b": "MKTJ"})
    bad = tmp_path / "bad.fasta"
    bad.write_text(">ok\nMKT\n>bad\nMK1T\n")
    with pytest.raises(InputError, match=r"invalid residue '1' at position 3"):
        localize_inputs(bad)
    empty = tmp_path / "empty.fasta"
    empty.write_text("")
    with pytest.raises(InputError, match="empty"):
        localize_inputs(empty)
    with pytest.raises(InputError, match="not found"):
        localize_inputs(tmp_path / "missing.fasta")
    with pytest.raises(InputError, match="no sequences"):
        localize_inputs({})


def test_run_localize_writes_nothing_on_failure(ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    with pytest.raises(InputError, match="invalid residue 'J' at position 2"):
        run_localize({"a": "MJ"}, out, checkpoint=ckpt, progress=False)
    empty = tmp_path / "empty.fasta"
    empty.write_text("\n")
    with pytest.raises(InputError):
        run_localize(empty, out, checkpoint=ckpt, progress=False)
    with pytest.raises(InputError, match="checkpoint"):
        run_localize(SEQS, out, checkpoint=tmp_path / "nowhere", progress=False)

    # a failure while writing (here: the plots) leaves no output and no temporary folder behind
    import protloc.plotting.localize as plotting

    def boom(*args, **kwargs):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(plotting, "plot_importance", boom)
    with pytest.raises(RuntimeError, match="plotting failed"):
        run_localize(SEQS, out, checkpoint=ckpt, ig_steps=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.fasta"]


def test_run_localize_caps_plots(ckpt: Path, tmp_path: Path) -> None:
    summary = run_localize(SEQS, tmp_path / "out", checkpoint=ckpt, ig_steps=2, max_plots=2, progress=False)
    assert summary["plots"] == 2 and sorted(p.name for p in (tmp_path / "out" / "importance").iterdir()) == [
        "nls.png",
        "short.png",
    ]
    assert [s["plot"] for s in summary["sequences"]] == ["importance/short.png", "importance/nls.png", None, None]
    assert len(pd.read_csv(tmp_path / "out" / "importance.csv")["protein"].unique()) == 4
