from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from protloc.plotting import composite, crop_grid


def test_composite_colours():
    nuc = np.zeros((8, 8))
    prot = np.zeros((8, 8))
    nuc[2, 2] = 5.0
    prot[5, 5] = 3.0
    rgb = composite(nuc, prot, saturation=100)
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.float32
    assert rgb[5, 5].tolist() == [0.0, 1.0, 0.0]  # protein: green
    r, g, b = rgb[2, 2]
    assert r == g == b > 0  # nucleus: grey
    with pytest.raises(ValueError):
        composite(nuc, prot[:4])


def test_crop_grid_returns_figure():
    crops = [(np.random.rand(10, 10), np.random.rand(10, 10)) for _ in range(5)]
    fig = crop_grid(crops, titles=[f"c{i}" for i in range(5)], ncols=3)
    assert isinstance(fig, Figure)
    assert sum(ax.has_data() for ax in fig.axes) == 5
    with pytest.raises(ValueError):
        crop_grid(crops, titles=["one"])
