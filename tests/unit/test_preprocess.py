"""Tests of protloc.data.preprocess on small synthetic images (disks as nuclei)."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from protloc.data.preprocess import (
    FovCrops,
    PrepareParams,
    cell_centres,
    downsample2x,
    extract_crops,
    max_project,
    normalize_distance,
    normalize_intensity,
    process_fov,
    segment_nuclei,
    signed_distance,
    threshold_mean,
)
from protloc.errors import ConfigError, InputError, ProtlocError


def disks(shape, centres, radii, *, value=1000.0, background=100.0, noise=20.0, seed=0):
    """Float32 image with bright disks on a noisy background, and the true disk mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = np.zeros(shape, dtype=bool)
    for (cy, cx), r in zip(centres, radii, strict=True):
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    img = np.where(mask, value, background).astype(np.float32)
    img += rng.normal(0.0, noise, shape).astype(np.float32)
    return img, mask


def grid_centres(n_side, spacing, offset):
    return [(offset + i * spacing, offset + j * spacing) for i in range(n_side) for j in range(n_side)]


# ----------------------------------------------------------------------------------------------------
# projection / downsampling / normalization


def test_max_project_values_and_2d_passthrough():
    stack = np.zeros((3, 4, 5), dtype=np.uint16)
    stack[0, 0, 0] = 7
    stack[2, 0, 0] = 3
    stack[1, 3, 4] = 9
    proj = max_project(stack)
    assert proj.shape == (4, 5) and proj.dtype == np.uint16
    assert proj[0, 0] == 7 and proj[3, 4] == 9 and proj.sum() == 16
    # (Z, C, Y, X) with axis=0 keeps the channel axis.
    assert max_project(np.zeros((3, 2, 4, 5))).shape == (2, 4, 5)
    img = np.arange(12).reshape(3, 4)
    assert max_project(img) is img
    with pytest.raises(InputError, match="a.tif"):
        max_project(np.zeros(5), source="a.tif")


def test_downsample2x_block_mean_and_odd_edge():
    img = np.arange(5 * 7, dtype=np.uint16).reshape(5, 7)
    out = downsample2x(img)
    assert out.shape == (2, 3) and out.dtype == np.float32
    expected = img[:4, :6].astype(np.float64).reshape(2, 2, 3, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(out, expected)
    # Leading axes are kept.
    assert downsample2x(np.ones((2, 6, 8))).shape == (2, 3, 4)
    with pytest.raises(InputError):
        downsample2x(np.ones((1, 5)))


def test_normalize_intensity_range_and_errors():
    rng = np.random.default_rng(1)
    img = rng.uniform(50, 4000, (32, 32)).astype(np.uint16)
    out = normalize_intensity(img)
    assert out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    robust = normalize_intensity(img, low=1, high=99)
    assert robust.min() == 0.0 and robust.max() == 1.0
    assert (robust == 1.0).sum() > 1  # top 1 % clipped
    bad = img.astype(np.float32)
    bad[3, 3] = np.nan
    with pytest.raises(InputError, match="x.tif.*NaN"):
        normalize_intensity(bad, source="x.tif")
    bad[3, 3] = np.inf
    with pytest.raises(InputError):
        normalize_intensity(bad)
    with pytest.raises(InputError, match="constant image: nothing to normalize"):
        normalize_intensity(np.full((8, 8), 5.0))
    with pytest.raises(ConfigError):
        normalize_intensity(img, low=50, high=10)


# ----------------------------------------------------------------------------------------------------
# segmentation


def test_segment_finds_separate_disks():
    centres = grid_centres(3, 50, 30)
    img, _ = disks((160, 160), centres, [12] * 9)
    labels = segment_nuclei(img)
    assert labels.dtype == np.int32
    assert labels.max() == 9
    assert set(np.unique(labels)) == set(range(10))
    for cy, cx in centres:
        assert labels[cy, cx] > 0
    assert len({labels[cy, cx] for cy, cx in centres}) == 9


def test_segment_splits_touching_disks_with_watershed():
    img, _ = disks((100, 120), [(50, 45), (50, 73)], [16, 16])
    merged = segment_nuclei(img, split_touching=False)
    assert merged.max() == 1
    labels = segment_nuclei(img)
    assert labels.max() == 2
    assert labels[50, 40] != labels[50, 78]
    assert labels[50, 40] > 0 and labels[50, 78] > 0


def test_segment_fills_holes_and_removes_specks():
    img, _ = disks((100, 100), [(50, 50)], [20], noise=5)
    img[47:54, 47:54] = 100.0  # a dark nucleolus-like hole
    img[5:8, 5:8] = 1000.0  # a 9-pixel speck
    labels = segment_nuclei(img, sigma=1.0, min_area=64)
    assert labels.max() == 1
    assert labels[50, 50] == 1
    assert labels[6, 6] == 0
    unfilled = segment_nuclei(img, sigma=1.0, min_area=64, fill_holes=False)
    assert unfilled[50, 50] == 0
    kept = segment_nuclei(img, sigma=1.0, min_area=4)
    assert kept.max() == 2


def test_segment_constant_and_nan(caplog):
    with caplog.at_level(logging.WARNING, logger="protloc.data.preprocess"):
        labels = segment_nuclei(np.full((40, 40), 3.0), source="c.tif")
    assert labels.dtype == np.int32 and not labels.any()
    assert "constant" in caplog.text
    img = np.ones((40, 40), dtype=np.float32)
    img[0, 0] = np.nan
    with pytest.raises(InputError, match="n.tif"):
        segment_nuclei(img, source="n.tif")
    with pytest.raises(InputError):
        segment_nuclei(np.ones((2, 3, 4)))
    with pytest.raises(ConfigError):
        segment_nuclei(img, method="otsu")


def test_segment_cellpose_needs_local_weights(tmp_path):
    img, _ = disks((40, 40), [(20, 20)], [8])
    with pytest.raises(ConfigError, match="cellpose_model"):
        segment_nuclei(img, method="cellpose")
    with pytest.raises(ProtlocError, match="not found"):
        segment_nuclei(img, method="cellpose", cellpose_model=str(tmp_path / "missing"))


def test_segment_and_distance_fast_enough():
    rng = np.random.default_rng(3)
    centres = [tuple(c) for c in rng.integers(30, 482, (25, 2))]
    img, _ = disks((512, 512), centres, list(rng.uniform(12, 20, 25)))
    segment_nuclei(img)  # warm-up (lazy imports)
    t0 = time.perf_counter()
    labels = segment_nuclei(img)
    signed_distance(labels)
    assert time.perf_counter() - t0 < 0.5


# ----------------------------------------------------------------------------------------------------
# distance


def test_signed_distance_sign_and_boundary():
    _, mask = disks((60, 60), [(30, 30)], [10], noise=0)
    d = signed_distance(mask)
    assert d.dtype == np.float32
    assert (d[mask] > 0).all() and (d[~mask] < 0).all()
    # Nearest background pixel of the centre is (31, 40): just outside the discrete disk of radius 10.
    assert d[30, 30] == pytest.approx(np.sqrt(101))
    # The sign flips between neighbouring pixels across the boundary: |d| is 1 on both sides.
    row = d[30]
    crossings = np.nonzero(np.diff(np.sign(row)))[0]
    assert len(crossings) == 2
    for i in crossings:
        assert abs(row[i]) == 1.0 and abs(row[i + 1]) == 1.0
    assert d[0, 0] == pytest.approx(-(np.hypot(30, 30) - 10), abs=1.0)
    # Label images work like masks.
    np.testing.assert_array_equal(signed_distance(mask.astype(np.int32) * 4), d)


def test_signed_distance_degenerate_inputs():
    with pytest.raises(InputError, match="no nuclei"):
        signed_distance(np.zeros((10, 10), dtype=np.int32))
    full = signed_distance(np.ones((5, 5), dtype=bool))
    assert np.isfinite(full).all() and (full > 0).all()
    assert full[2, 2] == 3.0 and full[0, 0] == 1.0


def test_normalize_distance_modes():
    _, mask = disks((80, 80), [(40, 30)], [12], noise=0)
    d = signed_distance(mask)
    sep = normalize_distance(d)
    assert sep.dtype == np.float32
    assert sep.min() == -1.0 and sep.max() == 1.0
    assert sep[40, 30] == 1.0
    assert ((sep > 0) == mask).all()
    mab = normalize_distance(d, mode="maxabs")
    assert mab.min() == -1.0 and 0 < mab.max() < 1.0
    np.testing.assert_allclose(mab, d / np.abs(d).max(), rtol=1e-6)
    z = np.array([[0.0, 2.0], [-4.0, 0.0]])
    np.testing.assert_array_equal(normalize_distance(z), [[0, 1], [-1, 0]])
    np.testing.assert_array_equal(normalize_distance(np.zeros((3, 3))), np.zeros((3, 3)))
    with pytest.raises(ConfigError):
        normalize_distance(d, mode="tanh")


# ----------------------------------------------------------------------------------------------------
# threshold / centres / crops


def test_threshold_mean():
    img = np.array([[0, 1], [2, 5]], dtype=np.uint16)  # mean 2
    out = threshold_mean(img)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[0, 0], [1, 1]])
    np.testing.assert_array_equal(threshold_mean(np.full((3, 3), 7.0)), np.ones((3, 3)))
    # A stack: each image at its own mean; invariant to min-max scaling.
    stack = np.stack([img, img * 10 + 3]).astype(np.float32)
    np.testing.assert_array_equal(threshold_mean(stack), np.stack([out, out]))
    rng = np.random.default_rng(0)
    noisy = rng.uniform(0, 100, (16, 16))
    np.testing.assert_array_equal(threshold_mean(noisy), threshold_mean(normalize_intensity(noisy)))


def test_cell_centres_skip_edges_and_centre_crops():
    shape = (120, 160)
    centres = [(60, 80), (10, 80), (60, 20), (60, 140), (115, 40)]
    img, _ = disks(shape, centres, [8, 8, 8, 8, 8], noise=0)
    labels = segment_nuclei(img, sigma=0.0, min_area=10)
    assert labels.max() == 5  # the one at y=115 is cut by the bottom edge
    c = cell_centres(labels, crop_size=42)
    assert c.dtype == np.int64 and c.shape[1] == 3
    # Crops of 42 centred at y=10, x=20 or x=140 leave the image; the nucleus at y=115 touches the border.
    assert c.shape[0] == 1
    y, x, lab = c[0]
    assert abs(y - 60) <= 1 and abs(x - 80) <= 1 and labels[60, 80] == lab
    small = cell_centres(labels, crop_size=8)
    assert {tuple(r[:2]) for r in small} == {(60, 80), (10, 80), (60, 20), (60, 140)}
    assert list(small[:, 2]) == sorted(small[:, 2])
    # margin: nucleus box [52, 69) x [12, 29) is 12 px from the left edge.
    assert (60, 20) in {tuple(r[:2]) for r in cell_centres(labels, crop_size=8, margin=12)}
    assert (60, 20) not in {tuple(r[:2]) for r in cell_centres(labels, crop_size=8, margin=13)}
    assert cell_centres(np.zeros((10, 10), dtype=np.int32), crop_size=4).shape == (0, 3)
    # The nucleus centroid is at the crop centre (+-1 px).
    crops = extract_crops({"mask": (labels > 0).astype(np.uint8)}, small, size=8)["mask"]
    for crop in crops:
        cy, cx = np.argwhere(crop).mean(axis=0)
        assert abs(cy - 4) <= 1 and abs(cx - 4) <= 1


def test_extract_crops_shapes_and_errors():
    a = np.arange(20 * 30, dtype=np.uint16).reshape(20, 30)
    b = a.astype(np.float32) * 2
    centres = np.array([[10, 10, 1], [10, 20, 2]])
    out = extract_crops({"a": a, "b": b}, centres, size=6)
    assert out["a"].shape == (2, 6, 6) and out["a"].dtype == np.uint16
    assert out["b"].dtype == np.float32
    np.testing.assert_array_equal(out["a"][1], a[7:13, 17:23])
    assert out["a"][0, 3, 3] == a[10, 10]
    empty = extract_crops({"a": a}, np.zeros((0, 3), dtype=np.int64), size=6)
    assert empty["a"].shape == (0, 6, 6)
    with pytest.raises(InputError, match=r"f.tif.*y=2, x=10"):
        extract_crops({"a": a}, np.array([[10, 10], [2, 10]]), size=6, source="f.tif")
    with pytest.raises(InputError, match="shape"):
        extract_crops({"a": a, "b": b[:10]}, centres, size=6)


# ----------------------------------------------------------------------------------------------------
# end to end


def synthetic_fov(seed=0):
    """A 2-channel z-stack 5 x 600 x 600 with 9 disk nuclei (3 x 3 grid) and cytoplasmic protein."""
    rng = np.random.default_rng(seed)
    centres = grid_centres(3, 180, 120)
    nucleus2d, mask = disks((600, 600), centres, [36] * 9, seed=seed)
    yy, xx = np.mgrid[:600, :600]
    ring = np.zeros((600, 600), dtype=bool)
    for cy, cx in centres:
        ring |= (yy - cy) ** 2 + (xx - cx) ** 2 <= 60**2
    protein2d = np.where(ring & ~mask, 600.0, 80.0) + rng.normal(0, 10, (600, 600))
    z = np.array([0.5, 0.8, 1.0, 0.8, 0.5])[:, None, None]
    nucleus = (nucleus2d[None] * z).clip(0).astype(np.uint16)
    protein = (protein2d[None] * z).clip(0).astype(np.uint16)
    return nucleus, protein, centres


def test_process_fov_end_to_end():
    nucleus, protein, centres = synthetic_fov()
    params = PrepareParams(cytoself_size=100, celle_size=128)
    out = process_fov(nucleus, protein, params=params, source="fov1")
    assert isinstance(out, FovCrops)
    assert out.labels.shape == (300, 300) and out.labels.max() == 9
    # 3 x 3 grid at 60, 150, 240 (after 2x downsampling): all crops of 100 fit (50..250).
    assert out.cytoself_centres.shape == (9, 3)
    got = {(int(y), int(x)) for y, x, _ in out.cytoself_centres}
    for cy, cx in centres:
        assert any(abs(y - cy / 2) <= 1 and abs(x - cx / 2) <= 1 for y, x in got)
    assert set(out.cytoself) == {"protein", "nucleus", "nucleus_distance"}
    for name in ("protein", "nucleus"):
        arr = out.cytoself[name]
        assert arr.shape == (9, 100, 100) and arr.dtype == np.float32
        assert arr.min() == 0.0 and arr.max() == 1.0
    dist = out.cytoself["nucleus_distance"]
    assert dist.shape == (9, 100, 100) and dist.dtype == np.float32
    assert dist.min() >= -1.0 and dist.max() <= 1.0
    assert (dist[:, 50, 50] == 1.0).sum() >= 7  # peak at the nucleus centre, +-1 px
    assert (dist[:, 49:52, 49:52].max(axis=(1, 2)) == 1.0).all()
    # CELL-E crops of 128 fit only around the middle nucleus (64 <= y, x <= 236).
    assert set(out.celle) == {"nucleus", "protein", "threshold"}
    k2 = len(out.celle_centres)
    assert k2 == 1 and np.abs(out.celle_centres[0, :2] - 150).max() <= 1
    assert out.celle["threshold"].shape == (k2, 128, 128) and out.celle["threshold"].dtype == np.uint8
    assert set(np.unique(out.celle["threshold"])) <= {0, 1}
    assert out.celle["protein"].dtype == np.float32 and out.celle["protein"].shape == (k2, 128, 128)
    # The threshold image of the cytoplasmic protein is 1 in the ring around the nucleus, 0 at its centre.
    assert (out.celle["threshold"][:, 64, 64] == 0).all()


def test_process_fov_options_and_errors(caplog):
    nucleus, protein, _ = synthetic_fov()
    out = process_fov(nucleus, protein, params=PrepareParams(celle_size=0, intensity_norm="fov"))
    assert out.celle == {} and out.celle_centres.shape == (0, 3)
    assert out.cytoself["protein"].shape == (9, 100, 100)
    # Per-FOV scaling: crops need not reach 0 and 1 each, but stay inside [0, 1].
    assert 0.0 <= out.cytoself["protein"].min() and out.cytoself["protein"].max() <= 1.0
    # A FOV smaller than the crop size gives no crops (warning), not an error.
    with caplog.at_level(logging.WARNING, logger="protloc.data.preprocess"):
        small = process_fov(nucleus, protein, params=PrepareParams(cytoself_size=0, celle_size=512))
    assert small.cytoself == {} and small.celle["protein"].shape == (0, 512, 512)
    assert "smaller than" in caplog.text
    # A constant protein channel (no signal) does not crash: crops are zeros.
    flat = process_fov(nucleus, np.zeros_like(protein), params=PrepareParams(celle_size=0))
    assert flat.cytoself["protein"].shape == (9, 100, 100) and not flat.cytoself["protein"].any()
    # 2-D inputs, no downsampling.
    two_d = process_fov(nucleus.max(0), protein.max(0), params=PrepareParams(downsample=False, celle_size=0))
    assert two_d.labels.shape == (600, 600) and two_d.labels.max() == 9
    with pytest.raises(InputError, match=r"fov2.*\(5, 600, 600\).*\(5, 600, 300\)"):
        process_fov(nucleus, protein[..., :300], params=PrepareParams(), source="fov2")
    bad = protein.astype(np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        process_fov(nucleus, bad, params=PrepareParams())
    with pytest.raises(ConfigError):
        PrepareParams(intensity_norm="global")
    with pytest.raises(ConfigError):
        PrepareParams(segmentation="cellpose")
