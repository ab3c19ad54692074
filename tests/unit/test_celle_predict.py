from __future__ import annotations

from pathlib import Path

import pytest
import torch

from protloc.errors import ConfigError, InputError
from protloc.eval.load import CelleRun
from protloc.eval.predict import (
    SamplingConfig,
    filter_top_k,
    generate,
    nucleus_mask,
    nucleus_proportion,
    predict,
    probability_map,
)
from protloc.models.celle import Celle, CelleConfig
from protloc.models.embedders import SequenceEncoder
from protloc.models.vqgan import VQGAN, VQGANConfig

torch.set_num_threads(1)

SEQS = ["MKVLAAGICWRRDEEQ", "MAY", "MSTNPKPQRKTKRNTNRRPQDVKFPGGGQ"]  # 16 (full window), 3, 29 (> 16: cropped)


def _cfg(mode: str = "autoregressive") -> CelleConfig:
    return CelleConfig.tiny(mode=mode).replace(grid_size=4, max_residues=16)


def _model(mode: str = "autoregressive", seed: int = 0) -> Celle:
    torch.manual_seed(seed)
    return Celle(_cfg(mode)).eval()


def _vqgan(seed: int) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(VQGANConfig.tiny().replace(image_size=32)).eval()


def _inputs(cfg: CelleConfig, seed: int = 1) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    text = SequenceEncoder(cfg)(["MKVLAAGICW", "MAY"], [True, True])
    g = torch.Generator().manual_seed(seed)
    nucleus = torch.randint(0, cfg.num_nucleus_codes, (len(text["text_mask"]), cfg.grid_tokens), generator=g)
    return text, nucleus


def _run(mode: str = "autoregressive") -> CelleRun:
    cfg = _cfg(mode)
    return CelleRun(
        model=_model(mode),
        nucleus=_vqgan(1),
        threshold=_vqgan(2),
        encoder=SequenceEncoder(cfg),
        checkpoint=Path("."),
        extra={"image_size": 32},
    )


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "changes",
    [
        {"temperature": 0.0},
        {"temperature": float("nan")},
        {"top_k_fraction": 0.0},
        {"top_k_fraction": 1.5},
        {"seed": -1},
        {"seed": 1.5},
        {"steps": 0},
        {"samples": 0},
        {"samples": True},
    ],
)
def test_sampling_config_errors(changes):
    with pytest.raises(ConfigError):
        SamplingConfig(**changes)


def test_filter_top_k_really_filters():
    logits = torch.randn(3, 5, 128)
    out = filter_top_k(logits, 0.25)
    finite = torch.isfinite(out)
    assert (finite.sum(-1) == 32).all()
    assert torch.equal(out[finite], logits[finite])
    # The survivors are the 32 largest.
    kth = logits.topk(32, dim=-1).values[..., -1:]
    assert torch.equal(finite, logits >= kth)
    assert torch.equal(filter_top_k(logits, 1.0), logits)
    assert (torch.isfinite(filter_top_k(torch.randn(2, 30), 0.1)).sum(-1) == 3).all()  # ceil(0.1 * 30) = 3
    with pytest.raises(ConfigError):
        filter_top_k(logits, 0.0)


# ---------------------------------------------------------------------------------------------- autoregressive


def test_autoregressive_generate_matches_teacher_forced_pass():
    model = _model()
    cfg = model.config
    text, nucleus = _inputs(cfg)
    out = generate(model, text=text, nucleus=nucleus, sampling=SamplingConfig(seed=3))
    G, K = cfg.grid_tokens, cfg.num_threshold_codes
    assert out.tokens.shape == (2, G) and out.tokens.dtype == torch.int64
    assert int(out.tokens.min()) >= 0 and int(out.tokens.max()) < K
    assert out.probs.shape == (2, G, K) and out.probs.dtype == torch.float32
    # Cached generation == uncached teacher-forced pass along the sampled path (token shift included).
    assert cfg.token_shift
    with torch.no_grad():
        logits = model(
            text_emb=text["text_emb"], text_mask=text["text_mask"], nucleus=nucleus, threshold=out.tokens[:, :-1]
        ).logits
    rows = logits[:, cfg.text_len + G - 1 :, cfg.threshold_offset :]  # row p predicts threshold token p
    assert rows.shape == (2, G, K)
    torch.testing.assert_close(rows.softmax(-1), out.probs, atol=1e-5, rtol=0)
    # Top-k: every sampled token lies among the 32 (25 % of 128) largest full-pass logits.
    top = rows.topk(32, dim=-1).indices
    assert (top == out.tokens[..., None]).any(-1).all()


def test_autoregressive_seeded():
    model = _model()
    text, nucleus = _inputs(model.config)
    a = generate(model, text=text, nucleus=nucleus, sampling=SamplingConfig(seed=5))
    b = generate(model, text=text, nucleus=nucleus, sampling=SamplingConfig(seed=5))
    c = generate(model, text=text, nucleus=nucleus, sampling=SamplingConfig(seed=6))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.probs, b.probs)
    assert not torch.equal(a.tokens, c.tokens)
    # An explicit generator, and a temperature that changes the recorded distribution.
    d = generate(
        model,
        text=text,
        nucleus=nucleus.reshape(2, 4, 4),
        sampling=SamplingConfig(temperature=0.5),
        generator=torch.Generator().manual_seed(5),
    )
    assert d.tokens.shape == (2, 16)
    torch.testing.assert_close(d.probs.sum(-1), torch.ones(2, 16))


def test_generate_restores_training_mode_and_checks_inputs():
    model = _model().train()
    text, nucleus = _inputs(model.config)
    generate(model, text=text, nucleus=nucleus)
    assert model.training
    with pytest.raises(InputError):
        generate(model, text=text, nucleus=nucleus[:, :5])
    with pytest.raises(InputError):
        generate(model, text={"text_emb": text["text_emb"]}, nucleus=nucleus)


# ---------------------------------------------------------------------------------------------- masked


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_masked_generate(steps):
    model = _model("masked")
    cfg = model.config
    text, nucleus = _inputs(cfg)
    s = SamplingConfig(seed=2, steps=steps)
    out = generate(model, text=text, nucleus=nucleus, sampling=s)
    G, K = cfg.grid_tokens, cfg.num_threshold_codes
    assert out.tokens.shape == (2, G) and out.probs.shape == (2, G, K)
    assert int(out.tokens.min()) >= 0 and int(out.tokens.max()) < K
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(2, G))
    # Each token was drawn among the top 25 % of the distribution recorded for its position.
    top = out.probs.topk(32, dim=-1).indices
    assert (top == out.tokens[..., None]).any(-1).all()
    again = generate(model, text=text, nucleus=nucleus, sampling=s)
    assert torch.equal(out.tokens, again.tokens) and torch.equal(out.probs, again.probs)
    other = generate(model, text=text, nucleus=nucleus, sampling=SamplingConfig(seed=9, steps=steps))
    assert not torch.equal(out.tokens, other.tokens)


def test_masked_single_step_is_one_pass():
    model = _model("masked")
    cfg = model.config
    text, nucleus = _inputs(cfg)
    out = generate(model, text=text, nucleus=nucleus, sampling=SamplingConfig(steps=1))
    G = cfg.grid_tokens
    with torch.no_grad():
        logits = model(
            text_emb=text["text_emb"],
            text_mask=text["text_mask"],
            nucleus=nucleus,
            threshold=torch.zeros(2, G, dtype=torch.long),
            threshold_mask=torch.ones(2, G, dtype=torch.bool),
        ).logits
    expected = logits[:, cfg.text_len + G :, cfg.threshold_offset :].softmax(-1)
    torch.testing.assert_close(out.probs, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- maps


def test_probability_map():
    vq = _vqgan(2)
    probs = torch.rand(2, 16, 128).softmax(-1)
    pdf = probability_map(vq, probs)
    assert pdf.shape == (2, 1, 32, 32) and (pdf >= 0).all()
    torch.testing.assert_close(pdf.sum(dim=(1, 2, 3)), torch.ones(2), atol=1e-5, rtol=0)
    # One-hot probabilities: the decoded token grid, clipped.
    tokens = torch.randint(0, 128, (2, 4, 4))
    onehot = torch.nn.functional.one_hot(tokens.reshape(2, 16), 128).float()
    with torch.no_grad():
        expected = vq.decode_indices(tokens).clamp(0, 1)
    raw = probability_map(vq, onehot, normalize=False)
    torch.testing.assert_close(raw, expected, atol=1e-4, rtol=0)
    with pytest.raises(InputError):
        probability_map(vq, probs[..., :64])


def test_nucleus_proportion():
    image = torch.zeros(3, 1, 4, 4)
    image[0, 0, :2] = 1.0  # half inside
    image[1, 0, 0, 0] = 2.0  # all inside
    mask = torch.zeros(3, 1, 4, 4, dtype=torch.bool)
    mask[:, 0, 0] = True
    mask[0, 0, 2] = True
    torch.testing.assert_close(nucleus_proportion(image, mask), torch.tensor([0.5, 1.0, 0.0]))
    nuc = torch.zeros(1, 1, 4, 4)
    nuc[..., 1:3, 1:3] = 1.0
    assert int(nucleus_mask(nuc).sum()) == 4


# ---------------------------------------------------------------------------------------------- predict


@pytest.mark.parametrize("mode", ["autoregressive", "masked"])
def test_predict(mode):
    run = _run(mode)
    nuc = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    out = predict(run, SEQS, nuc, sampling=SamplingConfig(samples=2, steps=2))
    assert out["threshold"].shape == (3, 1, 32, 32)
    assert set(out["threshold"].unique().tolist()) <= {0.0, 1.0}
    assert out["probability"].shape == (3, 1, 32, 32) and (out["probability"] >= 0).all()
    torch.testing.assert_close(out["probability"].sum(dim=(1, 2, 3)), torch.ones(3), atol=1e-5, rtol=0)
    assert out["samples_threshold"].shape == (3, 2, 1, 32, 32)
    assert out["tokens"].shape == (3, 2, 16)
    assert out["nucleus_mask"].shape == (3, 1, 32, 32) and out["nucleus_mask"].dtype == torch.bool
    p = out["nucleus_proportion"]
    assert p.shape == (3,) and ((p >= 0) & (p <= 1)).all()
    # Windows: 16 residues fill the window (no end token), 3 do not, 29 are cropped at the N-terminus.
    assert out["window_start"].tolist() == [0, 0, 0] and out["add_end"].tolist() == [False, True, False]
    # Deterministic for a seed.
    again = predict(run, SEQS, nuc, sampling=SamplingConfig(samples=2, steps=2))
    assert torch.equal(out["tokens"], again["tokens"])


def test_predict_errors():
    run = _run()
    nuc = torch.rand(1, 1, 32, 32)
    with pytest.raises(InputError, match="'J'"):
        predict(run, ["MKJL"], nuc)
    with pytest.raises(InputError):
        predict(run, ["MKL", "MKL"], nuc)  # two sequences, one image
    with pytest.raises(InputError):
        predict(run, ["MKL"], nuc * 2.0)  # pixels outside [0, 1]
    with pytest.raises(InputError):
        predict(run, ["MKL"], torch.rand(1, 1, 64, 64))
