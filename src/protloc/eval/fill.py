"""Image to sequence: fill masked residues of a sequence from a nucleus image and a protein-threshold image.

CELL-E 2's second direction, for masked-mode models trained with ``"text"`` in
:attr:`~protloc.models.celle.CelleConfig.masked_segments`: the masked residues enter the transformer as the
learned text ``[MASK]`` beside the given residues and both images (whole), and the text rows of the
bidirectional pass give a distribution over the residue at every masked position.

:func:`fill_residues` decodes like the masked image mode (MaskGIT): every step runs one pass for *all*
masked positions of the batch, draws a residue at each (Gumbel-max among the top-k, at a temperature),
and commits the most confident ones on a cosine schedule, so ``steps`` passes fill any number of
positions (``steps=1`` fills them all at once). CELL-E 2's code runs one pass per masked residue.

:func:`fill_sequences` wraps it for a loaded run: sequences with ``_`` at the masked positions, a nucleus
image and a threshold image per sequence, ``samples`` draws per input.

Examples
--------
>>> import torch
>>> from protloc.models.celle import Celle, CelleConfig
>>> cfg = CelleConfig.tiny(mode="masked").replace(grid_size=4, max_residues=16, masked_segments=("threshold", "text"))
>>> model = Celle(cfg).eval()
>>> ids = torch.tensor([[2, 15, 5, 10, 3]])  # <cls> M A F <sep>
>>> out = fill_residues(model, text_ids=ids, text_mask=torch.ones(1, 5, dtype=torch.bool),
...                     residue_mask=torch.tensor([[False, False, True, True, False]]),
...                     nucleus=torch.zeros(1, 16, dtype=torch.long), threshold=torch.zeros(1, 16, dtype=torch.long),
...                     embed=lambda i, m: torch.nn.functional.one_hot(i, 30)[..., 5:].float())
>>> out.probs.shape, int(out.step[0, 2]) >= 0
(torch.Size([1, 5, 20]), True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from protloc.data.sequences import Tokenizer, validate_sequence
from protloc.errors import ConfigError, InputError
from protloc.eval.predict import SamplingConfig, _masked_left, _sample
from protloc.models.celle import Celle

if TYPE_CHECKING:
    from protloc.eval.load import CelleRun

__all__ = ["MASK_CHAR", "STANDARD_AMINO_ACIDS", "FillResult", "fill_residues", "fill_sequences", "parse_masked"]

#: The 20 standard amino acids, the residues a fill may choose (alphabetical one-letter codes).
STANDARD_AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
#: Marks a masked residue in a sequence given to :func:`fill_sequences`.
MASK_CHAR = "_"
_TOKENIZER = Tokenizer()

Embed = Callable[[Tensor, Tensor], Tensor]


class FillResult(NamedTuple):
    """Output of :func:`fill_residues`.

    Attributes
    ----------
    ids
        ``int64 [B, L]``: the text ids with every masked position filled.
    probs
        ``float32 [B, L, A]``: at every masked position, the distribution over the ``A`` allowed residues
        (at the sampling temperature, before top-k) at the step it was committed; zeros elsewhere.
    step
        ``int64 [B, L]``: the 0-based step at which each masked position was committed, -1 elsewhere.
    """

    ids: Tensor
    probs: Tensor
    step: Tensor


def _check_model(model: Celle) -> None:
    if not isinstance(model, Celle):
        raise InputError(f"filling residues needs a Celle model, got {type(model).__name__}")
    c = model.config
    if c.mode != "masked" or "text" not in c.masked_segments:
        raise ConfigError(
            "this model cannot fill residues: image to sequence needs a masked-mode CELL-E trained with 'text' in "
            "model.masked_segments (e.g. --set model.mode=masked 'model.masked_segments=[threshold,text]')"
        )


@torch.no_grad()
def fill_residues(
    model: Celle,
    *,
    text_ids: Tensor,
    text_mask: Tensor,
    residue_mask: Tensor,
    nucleus: Tensor,
    threshold: Tensor,
    embed: Embed | None = None,
    sampling: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    alphabet: str = STANDARD_AMINO_ACIDS,
) -> FillResult:
    """Fill the masked residues of a batch from its images (masked-mode CELL-E with ``"text"`` masked).

    Parameters
    ----------
    model
        A masked-mode :class:`~protloc.models.celle.Celle` with ``"text"`` in ``masked_segments``.
    text_ids, text_mask
        ``[B, L]`` TAPE-layout ids (``<cls>``, residues, optional ``<sep>``, padding) and their mask; the ids
        under ``residue_mask`` are ignored.
    residue_mask
        ``bool [B, L]``: the residues to fill (real residue positions only).
    nucleus, threshold
        Token ids ``[B, G]`` (or ``[B, g, g]``) of the nucleus and protein-threshold images, both given whole.
    embed
        ``(ids, mask) -> [B, L, text_dim]``: the model's frozen per-residue embedder (e.g.
        ``run.encoder.embedder``), applied to the ids as they fill; None for the ``learned`` embedder
        (part of the model).
    sampling
        Temperature, top-k fraction (of ``alphabet``), seed and number of ``steps``.
    generator
        Gumbel-noise source (default: a CPU generator seeded with ``sampling.seed``).
    alphabet
        The residues a position may take (default the 20 standard amino acids).

    Returns
    -------
    FillResult
    """
    _check_model(model)
    sampling = sampling or SamplingConfig()
    c = model.config
    device = model.to_logits.weight.device
    if generator is None:
        generator = torch.Generator().manual_seed(sampling.seed)
    letters = sorted(set(alphabet))
    if not letters or any(a not in STANDARD_AMINO_ACIDS + "XBZUO" for a in letters):
        raise InputError(f"alphabet must be one-letter residue codes, got {alphabet!r}")
    allowed = torch.tensor([_TOKENIZER.vocab[a] for a in letters], device=device)  # [A]
    ids = text_ids.to(device).clone()
    mask = text_mask.to(device).bool()
    todo = residue_mask.to(device).bool().clone()
    if ids.shape != mask.shape or todo.shape != mask.shape:
        raise InputError(
            f"text_ids {tuple(ids.shape)}, text_mask {tuple(mask.shape)} and residue_mask {tuple(todo.shape)} differ"
        )
    if bool((todo & ~mask).any()) or bool(todo[:, 0].any()):
        raise InputError("residue_mask may only mark real residues (not the start token or padding)")
    trainable = model.text_embedder is not None
    if embed is None and not trainable:
        raise InputError(f"pass embed: the {c.embedder!r} embedder lives outside the model")
    nucleus = nucleus.to(device).reshape(nucleus.shape[0], -1)
    threshold = threshold.to(device).reshape(threshold.shape[0], -1)
    b, n = ids.shape
    ids[todo] = allowed[0]  # any residue: masked positions enter as [MASK]
    probs = torch.zeros(b, n, len(letters), dtype=torch.float32, device=device)
    step_of = torch.full((b, n), -1, dtype=torch.int64, device=device)
    total = todo.sum(dim=1)  # [B] positions to fill per sample
    was_training = model.training
    model.eval()
    try:
        for t in range(sampling.steps):
            if not bool(todo.any()):
                break
            text_emb = None if trainable else embed(ids, mask)  # type: ignore[misc]
            out = model(
                text_ids=ids,
                text_mask=mask,
                text_emb=text_emb,
                residue_mask=todo,
                nucleus=nucleus,
                threshold=threshold,
                trim_text=True,
            )
            keep = out.logits.shape[1] - 2 * c.grid_tokens  # text rows kept by trim_text
            # The image modes' sampler: tempered softmax, top-k of the alphabet, Gumbel-max.
            pick, p = _sample(out.logits[:, :keep].index_select(-1, allowed), sampling, generator)  # [B, keep](, A)
            conf = p.gather(-1, pick[..., None])[..., 0]
            # Commit per sample so that floor(n cos(pi/2 (t + 1) / T)) of its n positions stay masked.
            left = torch.tensor([_masked_left(t, sampling.steps, int(k)) for k in total.tolist()], device=device)  # [B]
            n_commit = (todo.sum(dim=1) - left).clamp_min(0)
            conf_all = torch.full((b, n), -1.0, device=device)
            conf_all[:, :keep] = torch.where(todo[:, :keep], conf, -1.0)
            rank = conf_all.argsort(dim=1, descending=True).argsort(dim=1)
            commit = todo & (rank < n_commit[:, None])
            pick_all = torch.zeros(b, n, dtype=torch.int64, device=device)
            pick_all[:, :keep] = pick
            p_all = torch.zeros_like(probs)
            p_all[:, :keep] = p
            ids = torch.where(commit, allowed[pick_all], ids)
            probs = torch.where(commit[..., None], p_all, probs)
            step_of = torch.where(commit, torch.full_like(step_of, t), step_of)
            todo = todo & ~commit
    finally:
        model.train(was_training)
    if bool(todo.any()):  # unreachable: the schedule leaves nothing after the last step
        raise RuntimeError("positions left unfilled after the last step")
    return FillResult(ids, probs, step_of)


def parse_masked(sequence: str, *, name: str = "sequence") -> tuple[str, list[int]]:
    """Split a sequence with ``_`` at masked positions into a valid placeholder sequence and the
    0-based masked positions.

    Raises
    ------
    InputError
        Naming the sequence and the residue when a character is neither a residue letter nor ``_``.
    """
    if not isinstance(sequence, str) or not sequence.strip():
        raise InputError(f"{name}: empty sequence")
    seq = "".join(sequence.split()).upper()
    positions = [i for i, ch in enumerate(seq) if ch == MASK_CHAR]
    placeholder = seq.replace(MASK_CHAR, "A")
    validate_sequence(placeholder, name=name)
    return placeholder, positions


@torch.no_grad()
def fill_sequences(
    run: CelleRun,
    sequences: Sequence[str],
    nucleus_images: Tensor,
    threshold_images: Tensor,
    *,
    sampling: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    alphabet: str = STANDARD_AMINO_ACIDS,
) -> dict[str, Any]:
    """Fill the ``_`` positions of sequences from nucleus and protein-threshold images (image to sequence).

    Parameters
    ----------
    run
        A masked-mode CELL-E trained with ``"text"`` masked (:func:`protloc.eval.load.load_celle_run`).
    sequences
        ``B`` sequences with ``_`` at the residues to fill, each within the model's ``max_residues``.
    nucleus_images, threshold_images
        ``[B, 1, S, S]`` in [0, 1] (threshold images binary), ``S = run.image_size``.
    sampling
        :class:`~protloc.eval.predict.SamplingConfig`: ``samples`` fills per input (one batch of
        ``B * samples``), ``steps`` passes, temperature, top-k fraction of ``alphabet``, seed.
    generator
        Gumbel-noise generator (default: seeded with ``sampling.seed``).
    alphabet
        Residues a position may take.

    Returns
    -------
    dict
        ``filled`` (``B`` lists of ``samples`` strings), ``positions`` (``B`` lists of 0-based masked
        positions), ``probs`` ``float32 [B, samples, L, A]`` (at the masked positions, by residue position
        ``L`` = longest sequence + 2; zeros elsewhere), ``step`` ``[B, samples, L]``, ``alphabet``.

    Raises
    ------
    InputError
        A sequence with no ``_``, an invalid residue, a sequence longer than the model's window, image
        shapes or values out of range.
    ConfigError
        A model not trained to fill residues.
    """
    model = run.model
    _check_model(model)
    sampling = sampling or SamplingConfig()
    c = model.config
    if isinstance(sequences, str):
        raise InputError("sequences must be a list of strings, got a single string")
    sequences = list(sequences)
    b, n, S = len(sequences), sampling.samples, run.image_size
    if b == 0:
        raise InputError("no sequences to fill")
    placeholders, positions = [], []
    for i, seq in enumerate(sequences):
        ph, pos = parse_masked(seq, name=f"sequence {i + 1}")
        if not pos:
            raise InputError(f"sequence {i + 1} has no '{MASK_CHAR}' to fill")
        if len(ph) > c.max_residues:
            raise InputError(
                f"sequence {i + 1} has {len(ph)} residues, more than the model's window of {c.max_residues}"
            )
        placeholders.append(ph)
        positions.append(pos)
    device = model.to_logits.weight.device
    for name, imgs in (("nucleus", nucleus_images), ("threshold", threshold_images)):
        if tuple(imgs.shape) != (b, 1, S, S):
            raise InputError(f"{name} images must be [{b}, 1, {S}, {S}] (one per sequence), got {tuple(imgs.shape)}")
        if not bool(torch.isfinite(imgs).all()) or float(imgs.min()) < 0.0 or float(imgs.max()) > 1.0:
            raise InputError(f"{name} image pixels must be finite and in [0, 1]")
    with torch.autocast(device_type=device.type, enabled=False):
        nuc = run.nucleus.encode(nucleus_images.to(device, torch.float32))[1].reshape(b, -1)
        thr = run.threshold.encode(threshold_images.to(device, torch.float32))[1].reshape(b, -1)
    # Whole sequences: the end token when it fits, as in training.
    ends = [len(ph) < c.max_residues for ph in placeholders]
    text = run.encoder(placeholders, ends)
    ids, tmask = text["text_ids"].to(device), text["text_mask"].to(device)
    rmask = torch.zeros_like(tmask)
    for i, pos in enumerate(positions):
        rmask[i, torch.tensor(pos, device=device) + 1] = True  # + 1: position 0 is <cls>
    embedder = run.encoder.embedder

    def embed(x: Tensor, m: Tensor) -> Tensor:
        assert embedder is not None
        return embedder(x, m).float()

    rep = lambda t: t.repeat_interleave(n, dim=0)  # noqa: E731 -- sample-major rows per input
    result = fill_residues(
        model,
        text_ids=rep(ids),
        text_mask=rep(tmask),
        residue_mask=rep(rmask),
        nucleus=rep(nuc),
        threshold=rep(thr),
        embed=None if embedder is None else embed,
        sampling=sampling,
        generator=generator,
        alphabet=alphabet,
    )
    letters = "".join(sorted(set(alphabet)))
    inv = {v: k for k, v in _TOKENIZER.vocab.items()}
    filled: list[list[str]] = []
    out_ids = result.ids.reshape(b, n, -1).cpu()
    for i, ph in enumerate(placeholders):
        row = []
        for s in range(n):
            chars = list(ph)
            for p in positions[i]:
                chars[p] = inv[int(out_ids[i, s, p + 1])]
            row.append("".join(chars))
        filled.append(row)
    L = result.probs.shape[1]
    return {
        "filled": filled,
        "positions": positions,
        # Drop the <cls> row so that index j is residue j (0-based).
        "probs": result.probs.reshape(b, n, L, -1)[:, :, 1:].cpu(),
        "step": result.step.reshape(b, n, L)[:, :, 1:].cpu(),
        "alphabet": letters,
    }
