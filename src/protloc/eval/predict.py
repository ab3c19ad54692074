"""CELL-E prediction: protein-threshold images and 2D probability density maps from a sequence and a nucleus image.

The generation core of ``protloc predict`` (Khwaja et al., CELL-E, Sec. 4.6 "Probability Density Maps",
S.3.7; CELL-E 2 for the masked mode):

- :func:`generate` samples the threshold-image tokens of a batch.

  * ``mode="autoregressive"`` (CELL-E): the sequence is embedded once (the caller passes the
    precomputed text) and the text + nucleus tokens go through the transformer in one cached step;
    then one threshold token per step, reusing the KV cache and the token-shift state
    (:meth:`protloc.models.celle.Celle.forward_step`). The reference re-runs the protein language model
    at all 256 steps and samples without its cache.
  * ``mode="masked"`` (CELL-E 2, MaskGIT): all threshold tokens start masked; ``steps`` bidirectional
    passes each sample every masked position and commit the most confident ones, following the cosine
    schedule.

  Each token is drawn by Gumbel-max sampling among the top 25 % of the threshold codes (Sec. 4.6: "filtering
  for the top 25% of tokens and applying top-k sampling with gumbel noise"), at a temperature, from a
  seeded generator. The reference's ``filter_thres=0.5`` is taken over all 1054 logits of which only the
  512 image codes are finite, so it keeps every code; here the fraction is of the segment's codes.

- :func:`probability_map` is the paper's Eq. 3: at every token position the softmax probabilities of the
  threshold codes weight the codebook vectors, ``v = sum_i w_i p(v_i)``, and the threshold VQGAN decodes
  the mixture; values are clipped to [0, 1] and each image is normalised to a 2D PDF. (The reference
  demo multiplies raw logits, not probabilities.) Non-finite probabilities or decoded images are refused
  (:class:`~protloc.errors.InputError`), never normalised into a uniform map.

- :func:`predict` wraps both for a loaded run (:func:`protloc.eval.load.load_celle_run`): deterministic
  N-terminal sequence window, nucleus tokenization, ``samples`` draws per input, decoded threshold
  images, the mean probability map and the nucleus proportion of S.3.7.

Examples
--------
>>> import torch
>>> from protloc.models.celle import Celle, CelleConfig
>>> cfg = CelleConfig.tiny().replace(grid_size=4, max_residues=16)
>>> model = Celle(cfg).eval()
>>> text = {"text_mask": torch.ones(2, 5, dtype=torch.bool), "text_emb": torch.randn(2, 5, cfg.text_dim)}
>>> out = generate(model, text=text, nucleus=torch.randint(0, 128, (2, 16)), sampling=SamplingConfig(seed=1))
>>> tuple(out.tokens.shape), tuple(out.probs.shape)
((2, 16), (2, 16, 128))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from protloc.data.sequences import crop_is_full_end, crop_sequence, validate_sequence
from protloc.errors import ConfigError, InputError
from protloc.eval.metrics import nucleus_mask, nucleus_proportion
from protloc.models.celle import Celle, trimmed_text_len
from protloc.models.vqgan import VQGAN

if TYPE_CHECKING:
    from protloc.eval.load import CelleRun

__all__ = [
    "GenerationResult",
    "SamplingConfig",
    "filter_top_k",
    "generate",
    "nucleus_mask",
    "nucleus_proportion",
    "predict",
    "probability_map",
    "sampling_config",
]


@dataclass(frozen=True)
class SamplingConfig:
    """How threshold tokens are sampled (paper Sec. 4.6).

    Attributes
    ----------
    temperature
        Logits are divided by it before the softmax and the Gumbel-max draw (> 0; 1 = the model's
        distribution, lower = sharper).
    top_k_fraction
        Fraction of the threshold codes kept before sampling (paper: the top 25 %, i.e. 128 of 512
        codes), in (0, 1]; 1 disables the filter.
    seed
        Seed of the Gumbel noise (when :func:`generate` gets no generator): same seed, same tokens.
    steps
        Decoding passes of the masked (CELL-E 2) mode; ignored by the autoregressive mode.
    samples
        Draws per input in :func:`predict`.
    """

    temperature: float = 1.0
    top_k_fraction: float = 0.25
    seed: int = 0
    steps: int = 8
    samples: int = 1

    def __post_init__(self) -> None:
        for name in ("temperature", "top_k_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_k_fraction <= 1:
            raise ConfigError(f"top_k_fraction must be in (0, 1], got {self.top_k_fraction}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        for name in ("steps", "samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def sampling_config(sampling: SamplingConfig | None = None, /, **fields: Any) -> SamplingConfig:
    """``sampling`` (default :class:`SamplingConfig`) with the :class:`SamplingConfig` fields given as keywords.

    Lets a function that takes ``sampling=`` also take the five sampling keywords (``samples``,
    ``temperature``, ``top_k_fraction``, ``steps``, ``seed``) without spelling them out.

    >>> sampling_config(samples=2, seed=3)
    SamplingConfig(temperature=1.0, top_k_fraction=0.25, seed=3, steps=8, samples=2)

    Raises
    ------
    TypeError
        A keyword that is not a :class:`SamplingConfig` field.
    ConfigError
        An invalid value.
    """
    names = [f.name for f in dataclasses.fields(SamplingConfig)]
    unknown = sorted(set(fields) - set(names))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)} (sampling fields: {', '.join(names)})")
    base = sampling if sampling is not None else SamplingConfig()
    return dataclasses.replace(base, **fields) if fields else base


class GenerationResult(NamedTuple):
    """Output of :func:`generate`.

    Attributes
    ----------
    tokens
        ``int64 [B, G]`` threshold-codebook indices in raster order (``0 .. K - 1``, not offset into the
        transformer's vocabulary).
    probs
        ``float32 [B, G, K]``: at every position, the softmax (at the sampling temperature, over the K
        threshold codes, before top-k filtering) from which its token was drawn. Every row sums to 1.
        These are the ``p(v_i)`` of Eq. 3 (:func:`probability_map`).
    """

    tokens: Tensor
    probs: Tensor


def filter_top_k(logits: Tensor, fraction: float) -> Tensor:
    """Keep the ``ceil(fraction * K)`` largest logits of the last dimension, ``-inf`` elsewhere.

    Paper Sec. 4.6: the next image patch is drawn among the top 25 % of the image codes. Apply this to
    the logits of one segment's codes only (e.g. the 512 threshold codes), not to the whole vocabulary.

    Parameters
    ----------
    logits
        ``[..., K]``.
    fraction
        In (0, 1].

    Returns
    -------
    torch.Tensor
        Same shape and dtype. Exactly ``k = ceil(fraction * K)`` entries of every row keep their value
        (ties at the k-th value are broken by :func:`torch.topk`, so never more than k survive); entries
        already ``-inf`` stay ``-inf``, so a row with fewer than k finite logits keeps only those.
    """
    if not 0 < fraction <= 1:
        raise ConfigError(f"top-k fraction must be in (0, 1], got {fraction}")
    n = logits.shape[-1]
    k = min(n, max(1, math.ceil(fraction * n - 1e-9)))  # the epsilon: 0.1 * 30 is 3.0000000000000004
    if k == n:
        return logits
    values, index = logits.topk(k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, index, values)


def _gumbel(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    """Standard Gumbel noise ``-log(-log u)``, drawn on the generator's device (so a seed gives the same
    noise whatever device the model is on), returned on ``device``."""
    u = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32)
    u = u.clamp_min(torch.finfo(torch.float32).tiny)  # u = 0 would give -inf noise (never drawn); keep it finite
    return (-torch.log(-torch.log(u))).to(device)


def _sample(
    logits: Tensor, sampling: SamplingConfig, generator: torch.Generator, noise_period: int | None = None
) -> tuple[Tensor, Tensor]:
    """Gumbel-max draw from the top-k filtered, tempered logits ``[B, ..., K]`` (paper Sec. 4.6).

    With ``noise_period`` the noise is drawn for that many rows and tiled over the batch (row ``r`` gets
    the noise of row ``r % noise_period``). Returns the tokens ``[B, ...]`` and the unfiltered softmax at
    the temperature ``[B, ..., K]``.
    """
    scaled = logits.float() / sampling.temperature
    probs = scaled.softmax(dim=-1)
    if noise_period is None:
        noise = _gumbel(tuple(scaled.shape), generator, scaled.device)
    else:
        noise = _gumbel((noise_period, *scaled.shape[1:]), generator, scaled.device)
        noise = noise.repeat(scaled.shape[0] // noise_period, *([1] * (scaled.dim() - 1)))
    return (filter_top_k(scaled, sampling.top_k_fraction) + noise).argmax(dim=-1), probs


def _text_kwargs(text: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor | None]:
    if "text_mask" not in text:
        raise InputError("text needs 'text_mask' (and 'text_emb' or 'text_ids'), as produced by SequenceEncoder")

    def get(key: str) -> Tensor | None:
        value = text.get(key)
        return None if value is None else value.to(device)

    return {"text_mask": get("text_mask"), "text_emb": get("text_emb"), "text_ids": get("text_ids")}


@torch.no_grad()
def generate(
    model: Celle,
    *,
    text: Mapping[str, Tensor],
    nucleus: Tensor,
    sampling: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    noise_period: int | None = None,
) -> GenerationResult:
    """Sample the threshold-image tokens of a batch (paper Sec. 4.6; CELL-E 2 for ``mode="masked"``).

    Parameters
    ----------
    model
        A :class:`~protloc.models.celle.Celle`; run in eval mode (its mode is restored afterwards) without
        gradients.
    text
        ``text_mask`` ``bool [B, L]`` and ``text_emb`` ``[B, L, text_dim]`` (frozen embedder) and / or
        ``text_ids`` ``int64 [B, L]`` (``learned`` embedder), e.g. from
        :class:`protloc.models.embedders.SequenceEncoder`. Embedded once, whatever the number of steps.
    nucleus
        Nucleus token ids ``[B, G]`` or ``[B, g, g]``.
    sampling
        Temperature, top-k fraction, seed and (masked mode) number of steps; default
        :class:`SamplingConfig`.
    generator
        Source of the Gumbel noise (noise is drawn on its device); default: a CPU generator seeded with
        ``sampling.seed``, so a seed gives the same tokens on every call.
    noise_period
        Common random numbers: draw the Gumbel noise for this many rows and repeat it over the batch
        (``B`` must be a multiple), so rows ``r`` and ``r + noise_period`` see the same noise and differ
        only by their inputs (in-silico screens, :mod:`protloc.analysis.screens`). Default: independent
        noise for every row.

    Returns
    -------
    GenerationResult
        ``tokens [B, G]`` and ``probs [B, G, K]``.

    Notes
    -----
    Autoregressive: one cached :meth:`~protloc.models.celle.Celle.forward_step` over text + nucleus,
    then one per threshold token (``G - 1`` more); the cached logits equal the teacher-forced pass along
    the sampled path.

    Masked (MaskGIT cosine schedule): every step runs one full bidirectional pass with the still-masked
    threshold positions replaced by ``[MASK]``, samples a token at every masked position (top-k + Gumbel)
    and commits the most confident ones (highest probability of the sampled token), so that
    ``floor(G cos(pi/2 (t + 1) / T))`` positions remain masked after step ``t`` (none after the last).
    A position's ``probs`` row is the distribution at the step it was committed: the one its token was
    drawn from, as in the autoregressive mode. The probability map thus gathers the predictions of all
    steps (each position from the step that decided it), not only the last step's as in CELL-E 2's code.
    """
    sampling = sampling or SamplingConfig()
    if not isinstance(model, Celle):
        raise InputError(f"generate needs a Celle model, got {type(model).__name__}")
    c = model.config
    device = model.to_logits.weight.device
    if generator is None:
        generator = torch.Generator().manual_seed(sampling.seed)
    kwargs = _text_kwargs(text, device)
    nucleus = nucleus.to(device)
    nucleus = nucleus.reshape(nucleus.shape[0], -1) if nucleus.dim() == 3 else nucleus
    if nucleus.dim() != 2 or nucleus.shape[1] != c.grid_tokens:
        raise InputError(f"nucleus tokens must be [B, {c.grid_tokens}] or [B, g, g], got {tuple(nucleus.shape)}")
    if noise_period is not None and (noise_period < 1 or nucleus.shape[0] % noise_period):
        raise InputError(f"noise_period {noise_period} does not divide the batch of {nucleus.shape[0]}")

    def draw(logits: Tensor) -> tuple[Tensor, Tensor]:
        return _sample(logits, sampling, generator, noise_period)

    was_training = model.training
    model.eval()
    try:
        if model.autoregressive:
            return _generate_autoregressive(model, kwargs, nucleus, draw)
        return _generate_masked(model, kwargs, nucleus, sampling.steps, draw)
    finally:
        model.train(was_training)


_Draw = Callable[[Tensor], tuple[Tensor, Tensor]]


def _generate_autoregressive(
    model: Celle, text: dict[str, Tensor | None], nucleus: Tensor, draw: _Draw
) -> GenerationResult:
    c = model.config
    b, G, o = nucleus.shape[0], c.grid_tokens, c.threshold_offset
    # The cache holds what is fed: the text up to the batch's longest sequence (padding left out), the
    # nucleus grid and G - 1 threshold tokens.
    cache = model.new_cache(b, max_len=trimmed_text_len(text["text_mask"]) + 2 * G - 1)  # type: ignore[arg-type]
    # Text (embedded once, outside) + the whole nucleus grid in one step; the last row predicts threshold token 0.
    # The padding after the batch's longest sequence is left out (exact): a protein costs its own length.
    logits = model.forward_step(cache, nucleus=nucleus, trim_text=True, **text)[:, -1, o:]  # [B, K]
    tokens = nucleus.new_zeros(b, G)
    probs = torch.empty(b, G, c.num_threshold_codes, dtype=torch.float32, device=nucleus.device)
    for i in range(G):
        tokens[:, i], probs[:, i] = draw(logits)
        if i + 1 < G:  # the last token is only a target (S.3.6): never fed back
            logits = model.forward_step(cache, threshold=tokens[:, i : i + 1])[:, -1, o:]
    return GenerationResult(tokens, probs)


def _masked_left(step: int, steps: int, total: int) -> int:
    """Positions still masked after 0-based ``step`` of ``steps``: ``floor(G cos(pi/2 (t + 1) / T))``."""
    if step + 1 >= steps:
        return 0
    return math.floor(total * math.cos(0.5 * math.pi * (step + 1) / steps))


def _generate_masked(
    model: Celle, text: dict[str, Tensor | None], nucleus: Tensor, steps: int, draw: _Draw
) -> GenerationResult:
    c = model.config
    b, G, K = nucleus.shape[0], c.grid_tokens, c.num_threshold_codes
    o = c.threshold_offset
    tokens = nucleus.new_zeros(b, G)  # ids under [MASK] never matter
    masked = torch.ones(b, G, dtype=torch.bool, device=nucleus.device)
    probs = torch.zeros(b, G, K, dtype=torch.float32, device=nucleus.device)
    n_masked = G
    for t in range(steps):
        # Text padding left out (exact); the threshold rows are the last G.
        out = model(threshold=tokens, threshold_mask=masked, nucleus=nucleus, trim_text=True, **text)
        logits = out.logits[:, -G:, o:]
        sampled, p = draw(logits)  # [B, G], [B, G, K]
        n_left = min(n_masked, _masked_left(t, steps, G))
        n_commit = n_masked - n_left
        if n_commit == 0:  # the schedule may stall for one step when steps > G
            continue
        # Commit the most confident masked positions (committed ones rank below any probability).
        confidence = torch.where(masked, p.gather(-1, sampled[..., None])[..., 0], -1.0)
        chosen = confidence.topk(n_commit, dim=-1).indices  # [B, n_commit]
        commit = torch.zeros_like(masked).scatter(-1, chosen, True)
        tokens = torch.where(commit, sampled, tokens)
        probs = torch.where(commit[..., None], p, probs)
        masked = masked & ~commit
        n_masked = n_left
    return GenerationResult(tokens, probs)


@torch.no_grad()
def probability_map(threshold_vqgan: VQGAN, probs: Tensor, *, normalize: bool = True) -> Tensor:
    """The 2D probability density map of paper Eq. 3: ``v = sum_i w_i p(v_i)``, decoded.

    At every token position the codebook vectors of the threshold VQGAN are averaged with the token
    probabilities, the threshold VQGAN decodes the grid of mixtures, values are clipped to [0, 1]
    ("The values are clipped between 0 and 1") and each image is normalised to sum 1 (a 2D PDF).

    Parameters
    ----------
    threshold_vqgan
        The threshold-image tokenizer (``K`` codes).
    probs
        ``[B, G, K]`` token probabilities (:attr:`GenerationResult.probs`), ``G = g * g`` in raster order.
    normalize
        Divide each image by its sum; an image clipped to all zeros becomes uniform. With ``False``, the
        clipped decoded map in [0, 1] (comparable pixel-wise to a threshold image: the "2D PDF pixel
        accuracy" of S.3.7).

    Returns
    -------
    torch.Tensor
        ``float32 [B, 1, S, S]``, non-negative (each image sums to 1 when ``normalize``).
    """
    codebook = threshold_vqgan.codebook.detach().float()  # [K, embed_dim]
    if probs.dim() != 3 or probs.shape[-1] != codebook.shape[0]:
        raise InputError(f"probs must be [B, G, {codebook.shape[0]}] (the threshold codes), got {tuple(probs.shape)}")
    b, G, _ = probs.shape
    g = math.isqrt(G)
    if g * g != G:
        raise InputError(f"{G} token positions do not form a square grid")
    _refuse_nonfinite(probs, "token probabilities")
    p = probs.float().clamp(0.0, 1.0).to(codebook.device)
    mixture = (p @ codebook).transpose(1, 2).reshape(b, codebook.shape[1], g, g)  # [B, embed_dim, g, g]
    with torch.autocast(device_type=mixture.device.type, enabled=False):
        image = threshold_vqgan.decode(mixture).float()  # [B, C, S, S]
    _refuse_nonfinite(image, "probability maps decoded by the threshold tokenizer")
    image = image.clamp(0.0, 1.0)
    if not normalize:
        return image
    total = image.sum(dim=(-3, -2, -1), keepdim=True)
    uniform = torch.full_like(image, 1.0 / image[0].numel())
    return torch.where(total > 0, image / total.clamp_min(torch.finfo(torch.float32).tiny), uniform)


def _refuse_nonfinite(
    values: Tensor, what: str, *, sequences: Sequence[str] | None = None, per: int = 1, path: Any = None
) -> None:
    """Raise :class:`InputError` if ``values`` ``[B, ...]`` hold NaN or Inf, naming the first bad rows
    (the sequences of ``sequences`` when given; row ``r`` belongs to sequence ``r // per``)."""
    finite = torch.isfinite(values).reshape(values.shape[0], -1).all(dim=1)
    if bool(finite.all()):
        return
    rows = torch.nonzero(~finite).flatten().tolist()
    if sequences is None:
        names = [f"row {r}" for r in rows[:5]]
    else:
        idx = sorted({r // per for r in rows})
        names = [f"input {i} ({_short(sequences[i])})" for i in idx[:5]]
        rows = idx
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    raise InputError(f"the {what} are NaN or infinite for {', '.join(names)}{more}; nothing was returned", path=path)


def _short(sequence: str) -> str:
    """A sequence for a message: its first residues and its length."""
    head = sequence if len(sequence) <= 12 else sequence[:12] + "..."
    return f"{head}, {len(sequence)} aa"


def _windows(sequences: Sequence[str], max_residues: int) -> tuple[list[str], list[int], list[bool]]:
    """Deterministic N-terminal windows (as :meth:`protloc.data.datasets.CelleDataset.window` at
    evaluation with ``eval_window="start"``), their starts and whether the end token is added."""
    windows, starts, ends = [], [], []
    for i, seq in enumerate(sequences):
        clean = validate_sequence(seq, name=f"input {i}")
        window, start = crop_sequence(clean, max_residues, mode="start")
        # S.3.6: the end token only when the window reaches the C-terminus (and fits beside BOS).
        windows.append(window)
        starts.append(start)
        ends.append(crop_is_full_end(clean, start, max_residues) and len(window) < max_residues)
    return windows, starts, ends


@torch.no_grad()
def predict(
    run: CelleRun,
    sequences: Sequence[str],
    nucleus_images: Tensor,
    *,
    sampling: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Predict protein-threshold images and probability maps for sequences and nucleus images.

    Parameters
    ----------
    run
        A trained model with its tokenizers and sequence encoder (:func:`protloc.eval.load.load_celle_run`).
    sequences
        ``B`` amino-acid sequences; longer than ``max_residues`` ones are cropped to the N-terminal
        window (deterministic; the reference draws a random window even at evaluation).
    nucleus_images
        ``[B, 1, S, S]`` nucleus crops in [0, 1], ``S = run.image_size``.
    sampling
        :class:`SamplingConfig`; ``samples`` draws are made per input (all in one batch of
        ``B * samples``: split large inputs into chunks).
    generator
        Gumbel-noise generator (default: seeded with ``sampling.seed``).

    Returns
    -------
    dict
        On the model's device:

        - ``threshold`` ``float32 [B, 1, S, S]`` in {0, 1}: the decoded threshold image binarised at 0.5;
          with several samples, the pixel-wise majority (mean of the samples >= 0.5);
        - ``probability`` ``float32 [B, 1, S, S]``: mean over samples of the normalised Eq. 3 maps (sums to 1);
        - ``samples_threshold`` ``[B, samples, 1, S, S]`` and ``tokens`` ``int64 [B, samples, G]``;
        - ``nucleus_mask`` ``bool [B, 1, S, S]`` (:func:`nucleus_mask`) and ``nucleus_proportion``
          ``[B]``: the probability map's share inside it (S.3.7);
        - ``window_start`` ``int64 [B]`` and ``add_end`` ``bool [B]``: the sequence window used.

    Raises
    ------
    InputError
        On an invalid residue (naming it), mismatched batch sizes or image sizes, pixel values outside [0, 1];
        or if the token probabilities or decoded images are NaN or infinite (naming the sequences).
    """
    sampling = sampling or SamplingConfig()
    model = run.model
    c = model.config
    device = model.to_logits.weight.device
    if isinstance(sequences, str):
        raise InputError("sequences must be a list of strings, got a single string")
    sequences = list(sequences)
    b, n, S = len(sequences), sampling.samples, run.image_size
    if b == 0:
        raise InputError("no sequences to predict")
    if nucleus_images.shape != (b, 1, S, S):
        raise InputError(
            f"nucleus images must be [{b}, 1, {S}, {S}] (one per sequence), got {tuple(nucleus_images.shape)}"
        )
    images = nucleus_images.to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(images).all()) or float(images.min()) < 0.0 or float(images.max()) > 1.0:
        raise InputError("nucleus image pixels must be finite and in [0, 1]")
    if run.nucleus.grid_size != c.grid_size or run.threshold.grid_size != c.grid_size:
        raise InputError(
            f"the tokenizers give {run.nucleus.grid_size} / {run.threshold.grid_size}-token grids at {S} px, "
            f"the model expects {c.grid_size}"
        )

    windows, starts, ends = _windows(sequences, c.max_residues)
    text = run.encoder(windows, ends)  # embedded once per input, reused by every sample and step
    with torch.autocast(device_type=device.type, enabled=False):
        nucleus_tokens = run.nucleus.encode(images)[1].reshape(b, -1)  # [B, G]
    # Sample-major within each input: rows i * n .. i * n + n - 1 are input i.
    text = {k: v.to(device).repeat_interleave(n, dim=0) for k, v in text.items()}
    result = generate(
        model, text=text, nucleus=nucleus_tokens.repeat_interleave(n, dim=0), sampling=sampling, generator=generator
    )
    # "input i" is the i-th sequence of this call (the CLI predicts its inputs in batches of --batch-size).
    named = {"sequences": sequences, "per": n, "path": run.checkpoint}
    _refuse_nonfinite(result.probs, "model's token probabilities", **named)
    g = c.grid_size
    with torch.autocast(device_type=device.type, enabled=False):
        decoded = run.threshold.decode_indices(result.tokens.reshape(b * n, g, g)).float()
    _refuse_nonfinite(decoded, "threshold images decoded by the threshold tokenizer", **named)
    samples_threshold = (decoded >= 0.5).float().reshape(b, n, 1, S, S)
    maps = probability_map(run.threshold, result.probs).reshape(b, n, 1, S, S)
    probability = maps.mean(dim=1)
    mask = nucleus_mask(images)
    return {
        "threshold": (samples_threshold.mean(dim=1) >= 0.5).float(),
        "probability": probability,
        "samples_threshold": samples_threshold,
        "tokens": result.tokens.reshape(b, n, -1),
        "nucleus_mask": mask,
        "nucleus_proportion": nucleus_proportion(probability, mask),
        "window_start": torch.tensor(starts, dtype=torch.int64, device=device),
        "add_end": torch.tensor(ends, dtype=torch.bool, device=device),
    }
