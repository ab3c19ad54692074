from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from protloc.analysis.screens import (
    SCREEN_COLUMNS,
    Variant,
    deletion_scan,
    insertion_variants,
    mutational_scan,
    predict_variants,
    residue_attention,
    truncation_series,
)
from protloc.errors import ConfigError, InputError
from protloc.eval.load import CelleRun
from protloc.eval.predict import SamplingConfig, predict
from protloc.models.celle import Celle, CelleConfig
from protloc.models.embedders import SequenceEncoder
from protloc.models.vqgan import VQGAN, VQGANConfig
from protloc.plotting.screens import plot_residue_attention, plot_screen

torch.set_num_threads(1)

WT = "MKVLAAGICWRRDEEQ"  # 16 residues
LONG = "MSTNPKPQRKTKRNTNRRPQDVKFPGGGQIVGGVYLLPRRGPRLGVRATRK"  # 51 > max_residues = 32


def _run(mode: str = "autoregressive") -> CelleRun:
    cfg = CelleConfig.tiny(mode=mode).replace(grid_size=4, max_residues=32)
    torch.manual_seed(0)
    model = Celle(cfg).eval()

    def vqgan(seed: int) -> VQGAN:
        torch.manual_seed(seed)
        return VQGAN(VQGANConfig.tiny().replace(image_size=32)).eval()

    return CelleRun(
        model=model,
        nucleus=vqgan(1),
        threshold=vqgan(2),
        encoder=SequenceEncoder(cfg),
        checkpoint=Path("."),
        extra={"image_size": 32},
    )


@pytest.fixture(scope="module")
def run() -> CelleRun:
    return _run()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------- generators


def test_insertion_variants():
    vs = insertion_variants(WT, {"NLS": "pkkkrkv", "rnd": "GGS"}, positions=["start", 5, "end"])
    assert len(vs) == 1 + 2 * 3
    assert vs[0] == Variant("wild type", WT, "wild type", None, "16 residues")
    assert [v.name for v in vs[1:4]] == ["NLS@start", "NLS@5", "NLS@end"]
    assert [v.position for v in vs[1:4]] == [0, 5, 16]
    assert vs[1].sequence == "PKKKRKV" + WT
    assert vs[2].sequence == WT[:5] + "PKKKRKV" + WT[5:]
    assert vs[3].sequence == WT + "PKKKRKV"
    assert vs[6].sequence == WT + "GGS" and all(v.kind == "insertion" for v in vs[1:])
    with pytest.raises(InputError, match="position"):
        insertion_variants(WT, {"NLS": "PKK"}, positions=[17])
    with pytest.raises(InputError, match="J"):
        insertion_variants(WT, {"bad": "PKJK"})
    with pytest.raises(InputError, match="1"):
        insertion_variants("MK1V", {"NLS": "PKK"})


def test_truncation_series():
    n_term = truncation_series(WT, step=5, min_length=4)
    assert [v.sequence for v in n_term] == [WT, WT[5:], WT[10:]]  # 16, 11, 6 (a 1-residue one is < 4)
    assert [v.name for v in n_term] == ["wild type", "aa6-16", "aa11-16"]
    assert all(v.kind == "deletion" and v.position == 0 for v in n_term[1:])
    c_term = truncation_series(WT, step=4, from_="c")
    assert [v.sequence for v in c_term] == [WT, WT[:12], WT[:8], WT[:4]]
    assert [v.position for v in c_term[1:]] == [12, 8, 4] and c_term[1].name == "aa1-12"
    with pytest.raises(ConfigError):
        truncation_series(WT, step=0)
    with pytest.raises(ConfigError):
        truncation_series(WT, step=2, from_="x")
    with pytest.raises(InputError, match="B|J"):
        truncation_series("MKJ", step=1)


def test_deletion_scan():
    vs = deletion_scan(WT, window=4)
    assert len(vs) == 1 + 4 and vs[0].kind == "wild type"
    assert [v.position for v in vs[1:]] == [0, 4, 8, 12]
    assert vs[2].sequence == WT[:4] + WT[8:] and vs[2].name == "del5-8"
    overlapping = deletion_scan(WT, window=4, step=3)
    assert [v.position for v in overlapping[1:]] == [0, 3, 6, 9, 12]
    assert all(len(v.sequence) == 12 for v in overlapping[1:])
    with pytest.raises(InputError, match="shorter"):
        deletion_scan("MKV", window=3)


def test_mutational_scan():
    ala = mutational_scan(WT)  # A at positions 4, 5 (0-based) is skipped
    assert len(ala) == 1 + 16 - 2 and ala[0].sequence == WT
    assert ala[1].name == "M1A" and ala[1].sequence == "A" + WT[1:] and ala[1].position == 0
    assert "A5A" not in {v.name for v in ala}
    full = mutational_scan(WT, residues="all", positions=[0, 15])
    assert len(full) == 1 + 2 * 19 and {v.kind for v in full[1:]} == {"substitution"}
    assert all(v.sequence[15] != "Q" for v in full[20:]) and full[-1].name == "Q16Y"
    assert all(sum(a != b for a, b in zip(v.sequence, WT, strict=True)) == 1 for v in full[1:])
    with pytest.raises(InputError, match="position"):
        mutational_scan(WT, positions=[16])
    with pytest.raises(InputError, match="J"):
        mutational_scan(WT, residues="J")


def test_variant_kind_checked():
    with pytest.raises(ConfigError):
        Variant("x", "MK", "frameshift")


# ---------------------------------------------------------------------------------------------- predict_variants


def test_run_screen_table(run, image):
    vs = insertion_variants(LONG, {"NLS": "PKKKRKV"}, positions=["start", "end"])
    vs += mutational_scan(LONG, positions=[2, 40])[1:]
    calls = []
    df = predict_variants(
        run,
        vs,
        image,
        sampling=SamplingConfig(samples=2, seed=3),
        batch_size=2,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert isinstance(df, pd.DataFrame) and list(df.columns) == list(SCREEN_COLUMNS) and len(df) == len(vs)
    assert list(df["name"]) == [v.name for v in vs] and list(df["length"]) == [len(v.sequence) for v in vs]
    assert df["delta"].iloc[0] == 0.0
    np.testing.assert_allclose(df["delta"], df["nucleus_proportion"] - df["nucleus_proportion"].iloc[0])
    assert df["nucleus_proportion"].between(0, 1).all() and np.isfinite(df["sd"]).all()
    assert pd.isna(df["position"].iloc[0]) and df["position"].iloc[1] == 0
    assert calls[-1] == (5, 5) and len(calls) == 3
    # LONG (51 aa) is cut to its first 32 residues: the C-terminal insertion and the substitution at
    # residue 41 lie beyond the window, the model cannot see them and (same noise) their delta is 0.
    assert list(df["input_changed"]) == [False, True, False, True, False]
    assert np.abs(df["delta"][~df["input_changed"]]).max() < 1e-6
    # One sample: no spread.
    one = predict_variants(run, vs[:2], image)
    assert one["sd"].isna().all()


def test_run_screen_batch_independent_common_random_numbers(run, image):
    """Each variant gets the same noise whatever its batch and batch position, and alone equals predict."""
    vs = insertion_variants(WT, {"NLS": "PKKKRKV"}, positions=["start", 8, "end"]) + deletion_scan(WT, window=8)[1:]
    sampling = SamplingConfig(samples=2, seed=7)
    a = predict_variants(run, vs, image, sampling=sampling, batch_size=5).set_index("name")
    b = predict_variants(run, vs[::-1], image, sampling=sampling, batch_size=2).set_index("name")
    np.testing.assert_allclose(a["nucleus_proportion"], b.loc[a.index, "nucleus_proportion"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(a["sd"], b.loc[a.index, "sd"], rtol=0, atol=1e-6)
    # A variant alone == predict with the same sampling (same noise for a batch of one).
    ref = predict(run, [vs[2].sequence], image, sampling=sampling)["nucleus_proportion"]
    assert abs(float(ref[0]) - a.loc[vs[2].name, "nucleus_proportion"]) < 1e-6
    # Another seed changes the draws.
    c = predict_variants(run, vs[:2], image, sampling=SamplingConfig(samples=2, seed=8))
    assert not np.allclose(c["nucleus_proportion"], a["nucleus_proportion"].iloc[:2], rtol=0, atol=1e-7)


def test_run_screen_masked_and_per_variant_images():
    run = _run("masked")
    vs = mutational_scan(WT, positions=[0, 1])
    images = torch.rand(len(vs), 1, 32, 32, generator=torch.Generator().manual_seed(1))
    df = predict_variants(run, vs, images, sampling=SamplingConfig(samples=1, steps=2), batch_size=2)
    alone = predict_variants(run, vs[1:2], images[1:2], sampling=SamplingConfig(samples=1, steps=2))
    assert abs(df["nucleus_proportion"].iloc[1] - alone["nucleus_proportion"].iloc[0]) < 1e-6


def test_run_screen_errors(run, image):
    vs = mutational_scan(WT, positions=[0])
    with pytest.raises(InputError):
        predict_variants(run, [], image)
    with pytest.raises(InputError):
        predict_variants(run, vs, torch.rand(3, 1, 32, 32))  # neither 1 nor len(vs) images
    with pytest.raises(InputError):
        predict_variants(run, vs, image * 2 + 0.5)
    with pytest.raises(InputError):
        predict_variants(run, [WT], image)  # a string, not a Variant


# ---------------------------------------------------------------------------------------------- attention


def test_residue_attention(run, image):
    res = residue_attention(run, WT, image, sampling=SamplingConfig(seed=2))
    G = run.model.config.grid_tokens
    for key in ("present", "background", "difference"):
        assert res[key].shape == (len(WT),)
    assert res["per_patch"].shape == (G, len(WT)) and np.isfinite(res["per_patch"]).all()
    assert (res["per_patch"] >= 0).all() and (res["per_patch"].sum(1) <= 1 + 1e-6).all()
    assert res["tokens"].shape == (G,) and res["residues"] == WT and res["window_start"] == 0
    assert res["n_present"] + res["n_background"] == G  # 0.5 / 0.5: every patch in one group
    # Split the patches around their median fraction so both groups are non-empty whatever the tiny model draws.
    cut = float(np.median(res["patch_fraction"]))
    if res["patch_fraction"].max() > cut:
        split = residue_attention(
            run, WT, image, threshold_tokens=res["tokens"], present_min=cut + 1e-9, background_max=cut + 1e-9
        )
    else:
        split = residue_attention(run, WT, image, threshold_tokens=res["tokens"], present_min=cut, background_max=cut)
    assert torch.equal(split["tokens"], res["tokens"])
    assert split["n_present"] > 0 and split["n_background"] > 0
    for key in ("present", "background", "difference"):
        assert np.isfinite(split[key]).all()
    np.testing.assert_allclose(split["difference"], split["present"] - split["background"])
    np.testing.assert_allclose(split["present"], split["per_patch"][split["present_patches"]].mean(0))
    # The raw layer mean and the median reduction, and a cropped long sequence (window of 32 residues).
    mean = residue_attention(
        run, LONG, image, threshold_tokens=res["tokens"].reshape(4, 4), method="mean", reduce="median"
    )
    assert mean["present"].shape == (32,) and mean["residues"] == LONG[:32]
    with pytest.raises(InputError):
        residue_attention(run, WT, image, threshold_tokens=[0] * 5)
    with pytest.raises(ConfigError):
        residue_attention(run, WT, image, method="gradient")


def test_residue_attention_masked(image):
    run = _run("masked")
    res = residue_attention(run, WT, image, sampling=SamplingConfig(steps=2))
    assert res["difference"].shape == (len(WT),)
    assert np.isfinite(res["per_patch"]).all()


# ---------------------------------------------------------------------------------------------- plots


def _table(positions, names=None) -> pd.DataFrame:
    n = len(positions)
    return pd.DataFrame(
        {
            "name": names or [f"v{i}" for i in range(n)],
            "kind": ["wild type"] + ["deletion"] * (n - 1),
            "position": pd.array([None, *positions[1:]], dtype="Int64"),
            "length": [10] * n,
            "detail": [""] * n,
            "nucleus_proportion": np.linspace(0.4, 0.6, n),
            "sd": [0.01] * n,
            "delta": np.linspace(0.4, 0.6, n) - 0.4,
            "input_changed": [False] + [True] * (n - 1),
        }
    )


@pytest.mark.parametrize("positions", [[None, 0, 4, 8], [None, 1, 1, 2], [None, None, None]])
def test_plot_screen(positions):
    df = _table(positions)
    if positions[1] is None:
        df["position"] = pd.array([None] * len(df), dtype="Int64")
    fig = plot_screen(df, title="screen")
    assert isinstance(fig, Figure)
    given = Figure()
    ax = given.subplots()
    assert plot_screen(df, ax=ax) is given
    with pytest.raises(InputError):
        plot_screen(df.drop(columns=["delta"]))


def test_plot_residue_attention(run, image):
    res = residue_attention(run, WT, image, method="mean")
    fig = plot_residue_attention(res, WT)
    assert isinstance(fig, Figure) and len(fig.axes[0].lines) >= 3
    given = Figure()
    ax = given.subplots()
    assert plot_residue_attention(res, WT, ax=ax, top=3) is given
    with pytest.raises(InputError):
        plot_residue_attention(res, WT[:5])
