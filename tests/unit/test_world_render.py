"""Tests of protloc.data.world.render: one field of view of the reference cell world."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from protloc.data.world.compartments import COMPARTMENTS, NUCLEAR
from protloc.data.world.render import (
    NucleusTemplate,
    RenderParams,
    expected_nucleus_proportion,
    prepare_nuclei_bank,
    render_fov,
)
from protloc.errors import ConfigError, InputError

C = {c: i for i, c in enumerate(COMPARTMENTS)}
PARAMS = RenderParams(size=256, real_nucleus_fraction=0.0, mitotic_fraction=0.0)


def pure(name: str) -> np.ndarray:
    w = np.zeros(len(COMPARTMENTS))
    w[C[name]] = 1.0
    return w


def fake_nuclei(n: int = 4, *, diameter: int = 70, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Nucleus-like patches at a foreign scale: textured ellipses with two dark nucleoli."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = diameter + 20
        yy, xx = np.mgrid[:s, :s] - s / 2
        a, b = diameter / 2 * rng.uniform(1.0, 1.2), diameter / 2 * rng.uniform(0.8, 1.0)
        mask = (yy / a) ** 2 + (xx / b) ** 2 <= 1
        img = 300 + 2000 * mask * (1 + 0.2 * ndi.gaussian_filter(rng.standard_normal((s, s)), 2) * 5)
        for cy, cx in ((-8, -6), (10, 8)):
            img -= 1200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 30) * mask
        out.append((np.clip(img, 0, None).astype(np.uint16), mask))
    return out


@pytest.fixture(scope="module")
def maps_fov():
    """All twelve compartment maps of one interphase field."""
    return render_fov(np.ones(12), params=PARAMS, rng=np.random.default_rng(11), return_maps=True)


# -- determinism, shapes ---------------------------------------------------------------------------


def test_same_seed_same_bytes_different_seed_differs():
    w = pure("mitochondria") * 0.5 + pure("nucleoplasm") * 0.5
    p = RenderParams(size=128, real_nucleus_fraction=0.0)
    a = render_fov(w, params=p, rng=np.random.default_rng(3))
    b = render_fov(w, params=p, rng=np.random.default_rng(3))
    c = render_fov(w, params=p, rng=np.random.default_rng(4))
    for name in ("nucleus", "protein", "nucleus_labels", "cell_labels", "mitotic"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name
    assert a.nucleus_proportion == b.nucleus_proportion
    assert a.protein.tobytes() != c.protein.tobytes()
    assert a.cell_labels.tobytes() != c.cell_labels.tobytes()


def test_return_maps_does_not_change_the_images():
    w = pure("golgi")
    p = RenderParams(size=128, real_nucleus_fraction=0.0)
    a = render_fov(w, params=p, rng=np.random.default_rng(5))
    b = render_fov(w, params=p, rng=np.random.default_rng(5), return_maps=True)
    assert a.compartment_maps is None
    assert b.compartment_maps.shape == (12, 128, 128) and b.compartment_maps.dtype == np.float32
    assert a.protein.tobytes() == b.protein.tobytes()
    assert a.nucleus.tobytes() == b.nucleus.tobytes()


def test_shapes_dtypes_and_label_consistency():
    fov = render_fov(pure("cytosol"), params=RenderParams(size=200), rng=np.random.default_rng(0))
    assert fov.nucleus.shape == fov.protein.shape == (200, 200)
    assert fov.nucleus.dtype == fov.protein.dtype == np.uint16
    assert fov.nucleus_labels.dtype == fov.cell_labels.dtype == np.int32
    assert fov.mitotic.dtype == bool and fov.mitotic.shape == (fov.n_cells + 1,) and not fov.mitotic[0]
    assert fov.expression.shape == (fov.n_cells + 1,) and np.all(fov.expression[1:] > 0)
    # labels are 1..n; nucleus k lies inside cell k
    assert set(np.unique(fov.cell_labels)) - {0} == set(range(1, fov.n_cells + 1))
    nuc = fov.nucleus_labels > 0
    assert np.array_equal(fov.nucleus_labels[nuc], fov.cell_labels[nuc])
    # HEK293T-like density: 1-3 cells per 100 x 100 crop on average
    assert 1.0 <= fov.n_cells / (200 * 200 / 100**2) <= 6.0
    # nuclei about 25-35 px across at 0.4 um / px
    areas = np.bincount(fov.nucleus_labels.ravel())[1:]
    inner = areas[areas > 0]
    diam = 2 * np.sqrt(np.median(inner) / np.pi)
    assert 20 <= diam <= 36


def test_z_stack_max_projection_recovers_focus():
    w = pure("vesicles")
    p2 = RenderParams(size=128, real_nucleus_fraction=0.0, mitotic_fraction=0.0)
    p3 = RenderParams(size=128, real_nucleus_fraction=0.0, mitotic_fraction=0.0, z=5)
    flat = render_fov(w, params=p2, rng=np.random.default_rng(9))
    stack = render_fov(w, params=p3, rng=np.random.default_rng(9))
    assert stack.protein.shape == stack.nucleus.shape == (5, 128, 128)
    assert stack.protein.dtype == np.uint16
    assert np.array_equal(flat.cell_labels, stack.cell_labels)  # same layout
    sharp = [ndi.laplace(s.astype(np.float32)).var() for s in stack.protein]
    assert int(np.argmax(sharp)) == 2  # the focal slice is the sharpest
    proj = stack.protein.max(axis=0).astype(np.float64)
    assert np.corrcoef(proj.ravel(), flat.protein.astype(np.float64).ravel())[0, 1] > 0.9


def test_noise_model_background_level():
    p = RenderParams(size=128, real_nucleus_fraction=0.0, background=50, gain_adu=2.0, offset_adu=100)
    fov = render_fov(pure("nucleolus"), params=p, rng=np.random.default_rng(2))
    far = ndi.distance_transform_edt(fov.cell_labels == 0) > 10
    assert far.sum() > 100
    bg = fov.protein[far].astype(np.float64)
    assert abs(bg.mean() - (100 + 2 * 50)) < 10
    # shot noise (gain^2 * photons) plus read noise
    assert 0.7 * np.sqrt(4 * 50 + 16) < bg.std() < 1.6 * np.sqrt(4 * 50 + 16)


def test_empty_field_is_background_only():
    fov = render_fov(pure("er"), params=RenderParams(size=32, cell_density=0.001), rng=np.random.default_rng(0))
    assert fov.n_cells == 0 and fov.nucleus_proportion == 0.0
    assert not fov.cell_labels.any() and fov.protein.dtype == np.uint16


# -- compartments land where they should -------------------------------------------------------------


def _inside(m: np.ndarray, mask: np.ndarray) -> float:
    return float(m[mask].sum() / m.sum())


@pytest.mark.parametrize("name", ["nucleoplasm", "nucleolus", "chromatin"])
def test_nuclear_compartments_inside_nuclei(maps_fov, name):
    assert _inside(maps_fov.compartment_maps[C[name]], maps_fov.nucleus_labels > 0) > 0.9


@pytest.mark.parametrize(
    "name", ["cytosol", "mitochondria", "er", "golgi", "vesicles", "plasma_membrane", "cytoskeleton", "centrosome"]
)
def test_cytoplasmic_compartments_outside_nuclei(maps_fov, name):
    assert _inside(maps_fov.compartment_maps[C[name]], maps_fov.nucleus_labels > 0) < 0.1


def test_nucleolus_sits_in_dark_holes_of_the_dna_stain(maps_fov):
    nol = maps_fov.compartment_maps[C["nucleolus"]]
    nuc = maps_fov.nucleus_labels > 0
    dna = maps_fov.nucleus.astype(np.float64)
    at_nucleoli = (dna * nol)[nuc].sum() / nol[nuc].sum()
    assert at_nucleoli < 0.85 * dna[nuc].mean()
    # compact: a small share of the nucleus area holds most of the signal
    vals = np.sort(nol[nuc])[::-1]
    assert vals[: int(0.25 * vals.size)].sum() > 0.8 * vals.sum()


def test_plasma_membrane_on_cell_outlines(maps_fov):
    labels = maps_fov.cell_labels
    edge = np.zeros(labels.shape, dtype=bool)
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:-1, :] |= labels[1:, :] != labels[:-1, :]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    near = ndi.distance_transform_edt(~edge) <= 2
    assert _inside(maps_fov.compartment_maps[C["plasma_membrane"]], near) > 0.8
    assert _inside(maps_fov.compartment_maps[C["cytosol"]], near) < 0.6


def test_nuclear_envelope_on_the_nucleus_rim(maps_fov):
    nuc = maps_fov.nucleus_labels > 0
    rim = (ndi.distance_transform_edt(~nuc) <= 2) & (ndi.distance_transform_edt(nuc) <= 2)
    assert _inside(maps_fov.compartment_maps[C["nuclear_envelope"]], rim) > 0.8
    assert _inside(maps_fov.compartment_maps[C["nucleoplasm"]], rim) < 0.5


def test_perinuclear_compartments(maps_fov):
    near = ndi.distance_transform_edt(maps_fov.nucleus_labels == 0) <= 8  # within ~3 um of a nucleus
    maps = maps_fov.compartment_maps
    assert _inside(maps[C["centrosome"]], near) > 0.8
    assert _inside(maps[C["golgi"]], near) > 0.7
    # the ER is denser near the nucleus than the cytosol is
    assert _inside(maps[C["er"]], near) > _inside(maps[C["cytosol"]], near) + 0.1
    # centrosomes are compact: per cell, the signal is spread over a few pixels only
    cen = maps[C["centrosome"]]
    labels = maps_fov.cell_labels
    yy, xx = np.indices(cen.shape)
    spreads = []
    for k in range(1, maps_fov.n_cells + 1):
        m = cen * (labels == k)
        tot = m.sum()
        if tot <= 0 or m.max() < 0.5 * cen.max() * 0.01:
            continue
        cy, cx = (m * yy).sum() / tot, (m * xx).sum() / tot
        spreads.append(np.sqrt((m * ((yy - cy) ** 2 + (xx - cx) ** 2)).sum() / tot))
    assert len(spreads) >= 5
    assert np.median(spreads) < 3.0


def test_compartment_maps_have_equal_totals_per_cell(maps_fov):
    # Every compartment holds the same total per cell (the cell's expression): weights are fractions.
    labels = maps_fov.cell_labels
    interior = np.setdiff1d(
        np.arange(1, maps_fov.n_cells + 1),
        np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])),
    )
    assert interior.size >= 5
    totals = np.stack(
        [np.bincount(labels.ravel(), weights=m.ravel(), minlength=labels.max() + 1) for m in maps_fov.compartment_maps]
    )
    ratio = totals[:, interior] / totals[C["cytosol"], interior]
    assert np.all(np.abs(np.median(ratio, axis=1) - 1) < 0.05)
    # and they scale with the per-cell expression level
    expr = maps_fov.expression[interior]
    assert np.corrcoef(totals[C["cytosol"], interior], expr)[0, 1] > 0.99


def test_nucleus_proportion_follows_the_weights():
    rng = np.random.default_rng(0)
    for k in range(4):
        w = rng.dirichlet(np.ones(12) * 0.3)
        fov = render_fov(w, params=RenderParams(size=160, real_nucleus_fraction=0.0), rng=np.random.default_rng(k))
        expected = expected_nucleus_proportion(w)
        assert expected == pytest.approx(sum(w[C[c]] for c in NUCLEAR) / w.sum())
        assert abs(fov.nucleus_proportion - expected) < 0.12, (w, fov.nucleus_proportion)


def test_mitotic_cells_condense_and_dissolve_nuclear_patterns():
    p_mit = RenderParams(size=160, real_nucleus_fraction=0.0, mitotic_fraction=1.0)
    p_int = RenderParams(size=160, real_nucleus_fraction=0.0, mitotic_fraction=0.0)
    mit = render_fov(np.ones(12), params=p_mit, rng=np.random.default_rng(1), return_maps=True)
    inter = render_fov(np.ones(12), params=p_int, rng=np.random.default_rng(1))
    assert mit.mitotic[1:].all() and not inter.mitotic.any()
    # condensed chromosomes: smaller, brighter nuclei
    assert (mit.nucleus_labels > 0).sum() < 0.6 * (inter.nucleus_labels > 0).sum()
    nuc = mit.nucleus_labels > 0
    assert mit.nucleus[nuc].mean() > inter.nucleus[inter.nucleus_labels > 0].mean()
    # nucleolus and nuclear envelope dissolve into the cytoplasm; chromatin stays on the chromosomes
    assert _inside(mit.compartment_maps[C["nucleolus"]], nuc) < 0.1
    assert _inside(mit.compartment_maps[C["chromatin"]], nuc) > 0.9


# -- nucleus bank -------------------------------------------------------------------------------------


def test_real_nuclei_are_rescaled_to_the_target_size():
    bank = prepare_nuclei_bank(fake_nuclei(3, diameter=70))
    assert len(bank) == 3 and all(isinstance(t, NucleusTemplate) for t in bank)
    assert all(t.nucleoli.max() > 0.5 for t in bank)  # dark holes found
    p = RenderParams(size=200, real_nucleus_fraction=1.0, mitotic_fraction=0.0)
    fov = render_fov(pure("nucleolus"), params=p, rng=np.random.default_rng(0), nuclei_bank=bank)
    areas = np.bincount(fov.nucleus_labels.ravel())[1:]
    diam = 2 * np.sqrt(np.median(areas[areas > 0]) / np.pi)
    assert 22 <= diam <= 36  # 12 um at 0.4 um / px, not the patches' 70 px
    # raw patches work too and give the same field
    raw = render_fov(pure("nucleolus"), params=p, rng=np.random.default_rng(0), nuclei_bank=fake_nuclei(3, diameter=70))
    assert raw.protein.tobytes() == fov.protein.tobytes()


def test_bank_rejects_mismatched_patches():
    with pytest.raises(InputError, match="same shape"):
        prepare_nuclei_bank([(np.zeros((10, 10)), np.zeros((9, 10), dtype=bool))])


# -- input checks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [np.ones(11), -np.ones(12), np.zeros(12), np.full(12, np.nan)])
def test_bad_weights_raise(weights):
    with pytest.raises(InputError, match="weights"):
        render_fov(weights, params=PARAMS, rng=np.random.default_rng(0))


@pytest.mark.parametrize(
    "kwargs",
    [{"size": 8}, {"z": 0}, {"pixel_size_um": -1.0}, {"mitotic_fraction": 2.0}, {"cell_to_nucleus_ratio": 1.0}],
)
def test_bad_params_raise(kwargs):
    with pytest.raises(ConfigError):
        RenderParams(**kwargs)
