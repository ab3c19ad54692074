from __future__ import annotations

import numpy as np
import pytest
import torch

from protloc.analysis.interpret import feature_zeroing, top_codes
from protloc.models.cytoself import Cytoself, CytoselfConfig


def test_top_codes():
    assert top_codes(np.array([[3, 3, 1], [3, 2, 1]]), k=2) == [3, 1]
    assert top_codes(np.zeros((0, 4), dtype=int)) == []


@pytest.mark.parametrize("level", ["local", "global"])
def test_feature_zeroing_is_causal(level):
    torch.manual_seed(0)
    model = Cytoself(CytoselfConfig.tiny(num_classes=3).replace(input_size=32)).eval()
    x = torch.rand(3, 2, 32, 32)
    enc = model.encode(x)
    idx = (enc.idx1 if level == "local" else enc.idx2).numpy()
    present = top_codes(idx, k=1)[0]
    absent = int(np.setdiff1d(np.arange(model.config.codebook_size1), idx.ravel())[0])
    res = feature_zeroing(model, x, [present, absent], level=level)
    assert res.reconstruction.shape == (3, 2, 32, 32)
    assert res.zeroed.shape == (2, 3, 2, 32, 32) and res.difference.shape == (2, 3, 32, 32)
    # zeroing an unused code changes nothing; zeroing the most used code changes the decoding
    assert np.abs(res.difference[1]).max() < 1e-6 and res.usage[1].max() == 0.0
    assert np.abs(res.difference[0]).max() > 1e-5 and res.usage[0].mean() > 0.0
    np.testing.assert_allclose(res.input_difference[1], x[:, 0].numpy() - res.reconstruction[:, 0], atol=1e-6)
