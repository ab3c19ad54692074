"""CELL-E evaluation metrics (paper S.3.7, Table S.2): hand-computed tiny cases, SSIM vs scikit-image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from protloc.errors import InputError
from protloc.eval import metrics as M


def img(*rows: list[float]) -> torch.Tensor:
    """One image ``[1, 1, S, S]`` from its rows."""
    return torch.tensor(rows, dtype=torch.float32)[None, None]


def on(size: int, *pixels: tuple[int, int], value: float = 1.0) -> torch.Tensor:
    """``[1, 1, size, size]`` zeros with ``value`` at ``pixels``."""
    x = torch.zeros(1, 1, size, size)
    for r, c in pixels:
        x[0, 0, r, c] = value
    return x


def block_nucleus(size: int, side: int) -> torch.Tensor:
    """Nucleus crop: ones in the top-left ``side x side`` block (its mean-threshold mask is that block)."""
    x = torch.zeros(1, 1, size, size)
    x[..., :side, :side] = 1.0
    return x


# 4 x 4 fixtures: nucleus = top-left 2 x 2 block
NUC4 = block_nucleus(4, 2)
MASK4 = M.nucleus_mask(NUC4)
TARGET4 = on(4, (0, 0), (0, 1), (3, 3), (3, 2))  # 2 of 4 on-pixels inside -> p = 1/2
PRED4 = on(4, (0, 0), (1, 1), (2, 2))  # 2 of 3 inside -> p = 2/3; differs from TARGET4 at 5 pixels
PDF4 = img([0.5, 0.25, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0.25])  # 0.75 of 1.0 inside


def test_nucleus_mask_reuses_vqgan_rule():
    assert MASK4.dtype == torch.bool
    expected = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    expected[..., :2, :2] = True
    assert torch.equal(MASK4, expected)
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(M.nucleus_mask(x), x >= x.mean(dim=(-2, -1), keepdim=True))


def test_nucleus_proportion_hand_computed():
    batch = torch.cat([TARGET4, PRED4, PDF4, torch.zeros(1, 1, 4, 4)])
    p = M.nucleus_proportion(batch, MASK4.expand(4, -1, -1, -1))
    assert p.shape == (4,) and p.dtype == torch.float32
    torch.testing.assert_close(p, torch.tensor([0.5, 2 / 3, 0.75, 0.0]))
    # numeric masks work as well as bool ones; negative values are clipped to 0
    torch.testing.assert_close(M.nucleus_proportion(PDF4 - 0.1 * (PDF4 == 0), MASK4.float()), torch.tensor([0.75]))


def test_nucleus_proportion_accuracy_hand_computed():
    acc = M.nucleus_proportion_accuracy(PRED4, TARGET4, MASK4)
    torch.testing.assert_close(acc, torch.tensor([1 - abs(2 / 3 - 0.5)]))
    torch.testing.assert_close(M.nucleus_proportion_accuracy(PDF4, TARGET4, MASK4), torch.tensor([0.75]))
    # all-zero prediction: p = 0 -> 1 - 1/2
    torch.testing.assert_close(
        M.nucleus_proportion_accuracy(torch.zeros_like(TARGET4), TARGET4, MASK4), torch.tensor([0.5])
    )
    torch.testing.assert_close(M.nucleus_proportion_accuracy(TARGET4, TARGET4, MASK4), torch.tensor([1.0]))


def test_threshold_pixel_accuracy_hand_computed():
    torch.testing.assert_close(M.threshold_pixel_accuracy(PRED4, TARGET4), torch.tensor([11 / 16]))
    torch.testing.assert_close(M.threshold_pixel_accuracy(TARGET4, TARGET4), torch.tensor([1.0]))
    torch.testing.assert_close(M.threshold_pixel_accuracy(torch.zeros_like(TARGET4), TARGET4), torch.tensor([12 / 16]))
    # decoder outputs are binarised at 0.5: 0.6 counts as on, 0.4 as off
    soft = 0.6 * TARGET4 + 0.4 * (1 - TARGET4)
    torch.testing.assert_close(M.threshold_pixel_accuracy(soft, TARGET4), torch.tensor([1.0]))


def test_pdf_pixel_accuracy_hand_computed():
    # |0.5-1| + |0.25-1| + |0.25-1| + |0-1| = 3 over 16 pixels (target pixel (0, 1) has pdf 0.25, (3, 2) has 0)
    torch.testing.assert_close(M.pdf_pixel_accuracy(PDF4, TARGET4), torch.tensor([1 - 3 / 16]))
    # divided by the max 0.5: |1-1| + |0.5-1| + |0.5-1| + |0-1| = 2
    torch.testing.assert_close(M.pdf_pixel_accuracy(PDF4, TARGET4, normalize="max"), torch.tensor([1 - 2 / 16]))
    torch.testing.assert_close(M.pdf_pixel_accuracy(TARGET4, TARGET4), torch.tensor([1.0]))
    zero = torch.zeros_like(TARGET4)
    torch.testing.assert_close(M.pdf_pixel_accuracy(zero, TARGET4), torch.tensor([12 / 16]))
    torch.testing.assert_close(M.pdf_pixel_accuracy(zero, TARGET4, normalize="max"), torch.tensor([12 / 16]))
    # overshoot is clipped to 1
    torch.testing.assert_close(M.pdf_pixel_accuracy(1.2 * TARGET4, TARGET4), torch.tensor([1.0]))
    with pytest.raises(InputError, match="normalize"):
        M.pdf_pixel_accuracy(PDF4, TARGET4, normalize="sum")  # type: ignore[arg-type]


def test_ssim_constant_images_hand_computed():
    c1 = 0.01**2
    a, b = torch.full((1, 1, 4, 4), 0.2), torch.full((1, 1, 4, 4), 0.7)
    # zero variance: SSIM = (2ab + C1) / (a^2 + b^2 + C1) at every window position
    torch.testing.assert_close(M.ssim(a, b, win_size=3), torch.tensor([(2 * 0.14 + c1) / (0.04 + 0.49 + c1)]))
    zero, one = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    torch.testing.assert_close(M.ssim(zero, one, win_size=3), torch.tensor([c1 / (1 + c1)]))


def test_ssim_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 16, 16, generator=g)
    noise = torch.randn(2, 1, 16, 16, generator=g)
    torch.testing.assert_close(M.ssim(x, x), torch.ones(2))
    y = (x + 0.1 * noise).clamp(0, 1)
    z = (x + 0.4 * noise).clamp(0, 1)
    torch.testing.assert_close(M.ssim(x, y), M.ssim(y, x))
    assert bool((M.ssim(x, z) < M.ssim(x, y)).all()) and bool((M.ssim(x, y) < 1).all())
    assert M.ssim(x.double(), y.double()).dtype == torch.float32


def test_ssim_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 24, 24, generator=g)
    y = (x + 0.2 * torch.randn(3, 1, 24, 24, generator=g)).clamp(0, 1)
    y[2] = (torch.rand(1, 24, 24, generator=g) > 0.7).float()  # a binary image too
    ours = M.ssim(x, y)
    ref = [
        metrics.structural_similarity(
            x[i, 0].double().numpy(),
            y[i, 0].double().numpy(),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
        )
        for i in range(3)
    ]
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-4)


def test_nuclear_localization_rule():
    three_in = on(4, (0, 0), (0, 1), (1, 0), (3, 3))  # 3/4 inside
    one_in = on(4, (0, 0), (2, 2), (3, 3), (2, 3))  # 1/4 inside
    half = on(4, (0, 0), (3, 3))  # exactly 1/2 -> not nuclear (strict "> 50%")
    batch = torch.cat([three_in, one_in, half, torch.zeros(1, 1, 4, 4)])
    mask = MASK4.expand(4, -1, -1, -1)
    calls = M.nuclear_localization(batch, mask)
    assert calls.dtype == torch.bool
    assert calls.tolist() == [True, False, False, False]
    assert M.nuclear_localization(batch, mask, threshold=0.2).tolist() == [True, True, True, False]
    # continuous maps: 0.3 + 0.3 inside vs 0.5 outside -> 0.6 / 1.1 > 0.5
    assert M.nuclear_localization(on(4, (0, 0), (1, 1), value=0.3) + on(4, (3, 3), value=0.5), MASK4).tolist() == [True]


def test_nuclear_localization_accuracy():
    nuclear, cytoplasmic = on(4, (0, 0), (0, 1), (3, 3)), on(4, (0, 0), (3, 3), (2, 2))
    pred = torch.cat([nuclear, nuclear, cytoplasmic, cytoplasmic])
    target = torch.cat([nuclear, cytoplasmic, nuclear, cytoplasmic])
    acc = M.nuclear_localization_accuracy(pred, target, MASK4.expand(4, -1, -1, -1))
    assert acc.dtype == torch.float32
    assert acc.tolist() == [1.0, 0.0, 0.0, 1.0]


# 12 x 12 fixtures for celle_metrics (the default 11 x 11 SSIM window needs S >= 11)
NUC12 = block_nucleus(12, 6)  # mean 0.25 -> mask = the 6 x 6 block
TARGET12 = on(12, (0, 0), (0, 1), (11, 11), (11, 10))  # p = 1/2
PRED12 = on(12, (0, 0), (1, 1), (7, 7))  # p = 2/3, 5 pixels differ from TARGET12
PDF12 = on(12, (0, 0), value=0.5) + on(12, (0, 1), (11, 11), value=0.25)  # p = 0.75


def test_celle_metrics_hand_computed():
    out = M.celle_metrics(pred_threshold=PRED12, pdf=PDF12, target_threshold=TARGET12, nucleus=NUC12)
    assert set(out) == {
        "nucleus_proportion_accuracy",
        "threshold_pixel_accuracy",
        "pdf_pixel_accuracy",
        "ssim",
        "nuclear_localization_correct",
        "nucleus_proportion_pred",
        "nucleus_proportion_true",
    }
    assert all(v.shape == (1,) and v.dtype == torch.float32 for v in out.values())
    # prediction-side proportion and localization come from the PDF (S.3.7), not the threshold image
    torch.testing.assert_close(out["nucleus_proportion_pred"], torch.tensor([0.75]))
    torch.testing.assert_close(out["nucleus_proportion_true"], torch.tensor([0.5]))
    torch.testing.assert_close(out["nucleus_proportion_accuracy"], torch.tensor([0.75]))
    torch.testing.assert_close(out["threshold_pixel_accuracy"], torch.tensor([1 - 5 / 144]))
    torch.testing.assert_close(out["pdf_pixel_accuracy"], torch.tensor([1 - 3 / 144]))
    torch.testing.assert_close(out["ssim"], M.ssim(PRED12, TARGET12))
    assert out["nuclear_localization_correct"].tolist() == [0.0]  # PDF 0.75 nuclear, target exactly 0.5 not


def test_celle_metrics_perfect_and_empty_predictions():
    target = torch.cat([TARGET12, on(12, (0, 0), (1, 1), (11, 0))])
    nucleus = torch.cat([NUC12, NUC12])
    perfect = M.celle_metrics(pred_threshold=target, pdf=target, target_threshold=target, nucleus=nucleus)
    for key, value in perfect.items():
        if not key.startswith("nucleus_proportion_"):
            torch.testing.assert_close(value, torch.ones(2), msg=key)
    torch.testing.assert_close(perfect["nucleus_proportion_true"], torch.tensor([0.5, 2 / 3]))

    zero = torch.zeros_like(target)
    empty = M.celle_metrics(pred_threshold=zero, pdf=zero, target_threshold=target, nucleus=nucleus)
    torch.testing.assert_close(empty["nucleus_proportion_pred"], torch.zeros(2))
    torch.testing.assert_close(empty["nucleus_proportion_accuracy"], torch.tensor([0.5, 1 / 3]))
    torch.testing.assert_close(empty["threshold_pixel_accuracy"], torch.tensor([1 - 4 / 144, 1 - 3 / 144]))
    torch.testing.assert_close(empty["pdf_pixel_accuracy"], torch.tensor([1 - 4 / 144, 1 - 3 / 144]))
    # first target is exactly 50% (non-nuclear, agrees with the empty call), second is nuclear
    assert empty["nuclear_localization_correct"].tolist() == [1.0, 0.0]
    # windows where both images are empty count as identical, so SSIM of a sparse target stays high
    torch.testing.assert_close(empty["ssim"], M.ssim(zero, target))
    assert bool((empty["ssim"] < 1).all())


def test_celle_metrics_vqgan_ceiling_without_pdf():
    out = M.celle_metrics(pred_threshold=PRED12, pdf=None, target_threshold=TARGET12, nucleus=NUC12)
    assert "pdf_pixel_accuracy" not in out
    torch.testing.assert_close(out["nucleus_proportion_pred"], torch.tensor([2 / 3]))
    # agrees with the VQGAN trainer's threshold_metrics
    ref = M.threshold_metrics(PRED12, TARGET12, NUC12)
    torch.testing.assert_close(out["nucleus_proportion_accuracy"], ref["nucleus_proportion_accuracy"])
    torch.testing.assert_close(out["threshold_pixel_accuracy"], ref["pixel_accuracy"])


def test_summarize_and_mean_sd():
    per_image = {
        "ssim": torch.tensor([0.2, 0.4, 0.9]),
        "nuclear_localization_correct": np.array([1.0, 0.0, 1.0]),
    }
    df = M.summarize(per_image, ["P2", "P2", "P1"])
    assert list(df.index) == ["P1", "P2"] and df.index.name == "protein_id"
    assert df.loc["P2", "ssim"] == pytest.approx(0.3) and df.loc["P1", "ssim"] == pytest.approx(0.9)
    assert df["n_images"].tolist() == [1, 2]
    assert df.loc["P2", "nuclear_localization_correct"] == pytest.approx(0.5)

    stats = M.mean_sd_over_proteins(df)
    assert set(stats) == {"ssim", "nuclear_localization_correct"}
    mean, sd = stats["ssim"]
    assert mean == pytest.approx(0.6) and sd == pytest.approx(0.3)  # population sd of {0.9, 0.3}
    assert M.mean_sd_over_proteins(df, ddof=1)["ssim"][1] == pytest.approx(0.3 * math.sqrt(2))
    assert stats["nuclear_localization_correct"] == pytest.approx((0.75, 0.25))

    images = M.mean_sd_over_images(per_image)
    p = 2 / 3  # the paper's 0/1 rows: mean p, sd sqrt(p (1 - p))
    assert images["nuclear_localization_correct"] == pytest.approx((p, math.sqrt(p * (1 - p))))
    assert images["ssim"][0] == pytest.approx(0.5)


def test_summarize_errors():
    with pytest.raises(InputError, match="3 values but there are 2"):
        M.summarize({"ssim": torch.zeros(3)}, ["a", "b"])
    with pytest.raises(InputError, match="1-D"):
        M.summarize({"ssim": torch.zeros(2, 1)}, ["a", "b"])
    with pytest.raises(InputError, match="reserved"):
        M.summarize({"n_images": torch.zeros(2)}, ["a", "b"])


@pytest.mark.parametrize(
    ("pred", "target", "match"),
    [
        (torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 8, 8), "shapes must match"),
        (torch.zeros(1, 4, 4), torch.zeros(1, 4, 4), r"\[B, 1, S, S\]"),
        (torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4), r"\[B, 1, S, S\]"),
        (torch.zeros(1, 1, 4, 5), torch.zeros(1, 1, 4, 5), r"\[B, 1, S, S\]"),
        (torch.full((1, 1, 4, 4), float("nan")), torch.zeros(1, 1, 4, 4), "pred_threshold contains 16 NaN/Inf"),
        (torch.zeros(1, 1, 4, 4), on(4, (0, 0), value=float("inf")), "target_threshold contains 1 NaN/Inf"),
        (np.zeros((1, 1, 4, 4)), torch.zeros(1, 1, 4, 4), "must be a torch.Tensor"),
    ],
)
def test_input_errors(pred, target, match):
    with pytest.raises(InputError, match=match):
        M.threshold_pixel_accuracy(pred, target)


def test_input_errors_other_functions():
    bad = PDF4.clone()
    bad[0, 0, 1, 1] = float("nan")
    with pytest.raises(InputError, match="pdf contains"):
        M.celle_metrics(pred_threshold=PRED4, pdf=bad, target_threshold=TARGET4, nucleus=NUC4)
    with pytest.raises(InputError, match="shapes must match"):
        M.nucleus_proportion(PDF4, torch.ones(1, 1, 2, 2, dtype=torch.bool))
    with pytest.raises(InputError, match="smaller than the SSIM window"):
        M.ssim(PDF4, PDF4)
    with pytest.raises(InputError, match="odd"):
        M.ssim(PDF4, PDF4, win_size=2)
    with pytest.raises(InputError, match="nucleus contains"):
        M.nucleus_mask(torch.full((1, 1, 4, 4), float("inf")))
