"""protloc.eval.evaluate: CELL-E, VQGAN-ceiling and sequence-baseline evaluations on shared crops (S.3.7)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from protloc.data.io import CropStore
from protloc.data.sequences import write_fasta
from protloc.errors import ConfigError, InputError
from protloc.eval.evaluate import (
    METRICS,
    EvaluationResult,
    evaluate_celle,
    format_table,
    select_crops,
    sequence_baseline,
    sequence_features,
    vqgan_ceiling,
)
from protloc.eval.load import load_celle_run
from protloc.eval.predict import SamplingConfig
from protloc.models.checkpoint import save_checkpoint
from protloc.models.vqgan import VQGAN, VQGANConfig
from protloc.train.celle import TrainCelleConfig, train_celle

S0, S = 40, 32  # stored crops, model images: random 32 px windows of 40 px crops
N_TRAIN, N_VAL = 12, 9
SEQS = {"P0": "MKTAYIAKQRQISFVKSHFSRQ", "P1": "PKKKRKV" * 3, "P2": "ACDEFGHIKLMNPQRSTVWY" * 3}
ID_AND_PROPORTIONS = ["protein_id", "index", "view", "nucleus_proportion_pred", "nucleus_proportion_true"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _make_store(path: Path) -> Path:
    rng = np.random.default_rng(0)
    n = N_TRAIN + N_VAL
    yy, xx = np.mgrid[:S0, :S0]
    centres = rng.uniform(10, 30, size=(n, 2))
    nucleus = np.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) / 40.0)
    # P1 mostly nuclear, the others spread out: the baseline has something to learn
    weight = np.array([0.9 if i % 3 == 1 else 0.2 for i in range(n)])[:, None, None]
    protein = np.clip(rng.random((n, S0, S0)) * ((1 - weight) + weight * nucleus), 0, 1)
    threshold = (protein >= protein.mean(axis=(1, 2), keepdims=True)).astype(np.uint8)
    obs = pd.DataFrame({"protein_id": [f"P{i % 3}" for i in range(n)], "split": ["train"] * N_TRAIN + ["val"] * N_VAL})
    channels = {"nucleus": "float16", "protein": "float16", "threshold": "uint8"}
    with CropStore.create(path, channels=channels, size=S0, chunk=8) as writer:
        writer.append({"nucleus": nucleus, "protein": protein, "threshold": threshold}, obs)
    write_fasta(path.parent / "sequences.fasta", SEQS)
    return path


def _tokenizer(path: Path, kind: str, seed: int) -> Path:
    torch.manual_seed(seed)
    cfg = VQGANConfig.tiny().replace(image_size=S)  # f = 8 -> 4 x 4 tokens
    save_checkpoint(path, model=VQGAN(cfg), config=cfg, extra={"kind": kind, "step": 0})
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("celle_eval")
    store = _make_store(root / "celle.zarr")
    base = TrainCelleConfig.tiny(
        str(store),
        nucleus=str(_tokenizer(root / "vq_nucleus", "nucleus", 0)),
        threshold=str(_tokenizer(root / "vq_threshold", "threshold", 1)),
    )
    cfg = dataclasses.replace(
        base,
        model=base.model.replace(grid_size=4, max_residues=32),
        data=dataclasses.replace(base.data, image_size=S, crop_size=S, batch_size=4, chunk_window=2),
        optim=dataclasses.replace(base.optim, warmup_steps=2),
        schedule=dataclasses.replace(base.schedule, max_steps=2, eval_every=2, log_every=1, eval_blank_sequence=False),
    )
    torch.set_num_threads(1)
    train_celle(cfg, run_dir=root / "run", progress=False)
    return {"store": store, "run_dir": root / "run", "run": load_celle_run(root / "run")}


def _celle(world, **kw) -> EvaluationResult:
    kw = {"sequences": SEQS, "progress": False, "batch_size": 4, **kw}
    return evaluate_celle(world["run"], world["store"], **kw)


def _in_range(values, name: str = "") -> bool:
    """Metrics lie in [0, 1]; SSIM in [-1, 1] (an untrained model can anti-correlate)."""
    arr = np.asarray(values, dtype=np.float64)
    low = -1.0 if name == "ssim" else 0.0
    return bool(np.all((arr >= low - 1e-6) & (arr <= 1 + 1e-6)))


# --------------------------------------------------------------------------------------------------- CELL-E
def test_evaluate_celle_shapes_columns_and_ranges(world):
    res = _celle(world, keep_images=True)
    assert list(res.per_image.columns) == ID_AND_PROPORTIONS[:3] + list(METRICS) + ID_AND_PROPORTIONS[3:]
    assert len(res.per_image) == N_VAL
    assert res.per_image["index"].tolist() == list(range(N_TRAIN, N_TRAIN + N_VAL))  # store order
    for m in METRICS:
        assert _in_range(res.per_image[m], m), m
    assert set(res.per_image["nuclear_localization_correct"]) <= {0.0, 1.0}
    assert list(res.per_protein.index) == ["P0", "P1", "P2"] and res.per_protein["n_images"].sum() == N_VAL
    for table in (res.table, res.table_images):
        assert set(METRICS) <= set(table)
        assert all(_in_range(table[m][0], m) and table[m][1] >= 0 for m in METRICS)
    mean = res.per_image["ssim"].mean()
    assert res.table_images["ssim"][0] == pytest.approx(mean)
    assert {k: tuple(v.shape) for k, v in res.images.items()} == {
        k: (N_VAL, 1, S, S) for k in ("nucleus", "target", "pred_threshold", "pdf")
    }
    assert res.info["name"] == "CELL-E" and res.info["crop_size"] == S


def test_evaluate_celle_is_deterministic_and_crops_follow_the_seed(world):
    a = _celle(world, keep_images=True)
    b = evaluate_celle(world["run_dir"], world["store"], sequences=SEQS, progress=False, batch_size=4, keep_images=True)
    pd.testing.assert_frame_equal(a.per_image, b.per_image)  # loaded from the path: same run, same result
    assert torch.equal(a.images["target"], b.images["target"]) and torch.equal(a.images["pdf"], b.images["pdf"])
    other = _celle(world, seed=1, keep_images=True)
    assert not torch.equal(a.images["target"], other.images["target"])
    assert (a.per_image["view"] != other.per_image["view"]).any()
    plain = _celle(world, augment=False, keep_images=True)
    assert plain.per_image["view"].nunique() == 1  # centre crop, no flip


def test_max_crops_subsamples_the_same_crops(world):
    a = _celle(world, max_crops=4)
    b = _celle(world, max_crops=4, sampling=SamplingConfig(seed=3, samples=5))  # samples ignored
    assert len(a.per_image) == 4 and a.per_image["index"].is_monotonic_increasing
    assert a.per_image[["index", "view"]].equals(b.per_image[["index", "view"]])
    c = _celle(world, max_crops=6)
    assert set(a.per_image["index"]) <= set(c.per_image["index"])  # nested subsamples
    assert select_crops(10, None, 0).tolist() == list(range(10))
    with pytest.raises(ConfigError):
        select_crops(10, 0, 0)
    with pytest.raises(ConfigError):
        _celle(world, batch_size=0)


# --------------------------------------------------------------------------------------------- VQGAN ceiling
def test_vqgan_ceiling_uses_the_same_crops(world):
    ceil = vqgan_ceiling(world["run"], world["store"], progress=False, keep_images=True)  # no sequences needed
    celle = _celle(world, keep_images=True)
    assert "pdf_pixel_accuracy" not in ceil.per_image.columns
    assert set(METRICS) - {"pdf_pixel_accuracy"} <= set(ceil.table)
    for m in ceil.metrics:
        assert _in_range(ceil.per_image[m], m), m
    assert ceil.per_image[["protein_id", "index", "view"]].equals(celle.per_image[["protein_id", "index", "view"]])
    assert torch.equal(ceil.images["target"], celle.images["target"])
    # the target proportion does not depend on the model
    np.testing.assert_allclose(ceil.per_image["nucleus_proportion_true"], celle.per_image["nucleus_proportion_true"])


# ----------------------------------------------------------------------------------------- sequence baseline
def test_sequence_features():
    x = sequence_features(["AAC", "", "AXA"])
    assert x.shape == (3, 420)
    assert x[0, 0] == pytest.approx(2 / 3) and x[0, 1] == pytest.approx(1 / 3)  # A, C
    assert x[0, 20 + 0] == pytest.approx(0.5) and x[0, 20 + 1] == pytest.approx(0.5)  # AA, AC
    assert not x[1].any()
    assert x[2, 0] == 1.0 and not x[2, 20:].any()  # X skipped, no standard dipeptide
    np.testing.assert_allclose(x[0, :20].sum(), 1.0)
    with pytest.raises(InputError):
        sequence_features("MKV")


def test_sequence_baseline_trains_and_predicts(world):
    res = sequence_baseline(world["store"], sequences=SEQS, image_size=S, crop_size=S, progress=False)
    assert list(res.per_image.columns) == [
        "protein_id",
        "index",
        "view",
        "nucleus_proportion_accuracy",
        "nuclear_localization_correct",
        "nucleus_proportion_pred",
        "nucleus_proportion_true",
    ]
    assert len(res.per_image) == N_VAL
    for m in res.metrics:
        assert _in_range(res.per_image[m], m), m
    # one prediction per protein
    assert (res.per_image.groupby("protein_id")["nucleus_proportion_pred"].nunique() == 1).all()
    assert res.info["train_proteins"] == 3 and res.info["alpha"] > 0
    # the same crops (and target proportions) as CELL-E with the same seed and geometry
    celle = _celle(world)
    assert res.per_image[["index", "view"]].equals(celle.per_image[["index", "view"]])
    np.testing.assert_allclose(res.per_image["nucleus_proportion_true"], celle.per_image["nucleus_proportion_true"])
    capped = sequence_baseline(
        world["store"],
        sequences=SEQS,
        image_size=S,
        crop_size=S,
        train_crops_per_protein=1,
        max_crops=3,
        progress=False,
    )
    assert capped.info["train_crops"] == 3 and len(capped.per_image) == 3
    with pytest.raises(InputError, match="sequence"):
        sequence_baseline(world["store"], sequences={"P0": "MKV"}, progress=False)


# --------------------------------------------------------------------------------------------------- table
def test_format_table(world):
    results = {
        "VQGAN ceiling": vqgan_ceiling(world["run"], world["store"], sequences=SEQS, max_crops=3, progress=False),
        "CELL-E": _celle(world, max_crops=3),
        "sequence baseline": sequence_baseline(
            world["store"], sequences=SEQS, image_size=S, crop_size=S, max_crops=3, progress=False
        ),
    }
    text = format_table(results)
    lines = text.strip().splitlines()
    assert len(lines) == 2 + 3
    for name in results:
        assert any(line.startswith(f"| {name} |") for line in lines)
    assert "SSIM" in lines[0] and "Predicted 2D PDF pixel accuracy" in lines[0]
    assert "+-" in lines[3]
    ceiling_row = lines[2].split("|")[1:-1]
    assert ceiling_row[3].strip() == "-"  # no PDF for the ceiling
    baseline_row = lines[4].split("|")[1:-1]
    assert [c.strip() for c in baseline_row[2:5]] == ["-", "-", "-"]  # no images from the baseline
    assert "+-" in format_table(results, over="images", metrics=["ssim"]).splitlines()[3]
    with pytest.raises(ConfigError):
        format_table(results, over="crops")
    with pytest.raises(InputError):
        format_table({})
