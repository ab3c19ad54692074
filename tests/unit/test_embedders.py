from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from protloc.data.sequences import STANDARD, Tokenizer
from protloc.errors import ConfigError, InputError, ProtlocError
from protloc.models.embedders import (
    DESCRIPTOR_SCALES,
    EMBEDDERS,
    DescriptorEmbedder,
    EmbeddingCache,
    LearnedEmbedder,
    OneHotEmbedder,
    build_embedder,
    descriptor_table,
    pad_embeddings,
)

SEQS = ["MKVLAAGIC", "MSTNPKPQRKTKRNTNRRPQDVKFPGG", "MA"]
TOK = Tokenizer()


def test_registry_and_errors():
    assert set(EMBEDDERS) == {"onehot", "descriptors", "learned", "esm2", "tape", "encoder"}
    with pytest.raises(ConfigError, match="did you mean 'onehot'"):
        build_embedder("onehott")
    with pytest.raises(ConfigError):
        build_embedder("onehot", nonsense=1)


def test_tokenize_layout():
    emb = build_embedder("onehot")
    ids, mask = emb.tokenize(["MKV", "MA"], max_len=10, add_end=[True, False])
    assert ids[:, 0].tolist() == [TOK.cls_id, TOK.cls_id]  # BOS at position 0
    assert ids[0, -1] == TOK.sep_id and ids[1, 3] == TOK.pad_id
    assert mask.tolist() == [[True] * 5, [True, True, True, False, False]]
    with pytest.raises(InputError):
        emb.tokenize(["M" * 11], max_len=10)


def test_onehot():
    emb = OneHotEmbedder()
    assert emb.dim == 25 and emb.frozen and not emb.training
    ids, mask = emb.tokenize(SEQS, max_len=50)
    out = emb(ids, mask)
    assert out.shape == (3, ids.shape[1], 25)
    real = mask.clone()
    real[:, 0] = False
    real &= ids != TOK.sep_id
    torch.testing.assert_close(out[real].sum(-1), torch.ones(int(real.sum())))
    assert out[~real].abs().sum() == 0  # specials and padding are zero rows
    assert out[0, 1].argmax() == TOK.vocab["M"] - 5
    emb.train()
    assert not emb.training  # frozen embedders stay in eval mode
    special = OneHotEmbedder(special_channels=True)
    out = special(ids, mask)
    assert special.dim == 27 and out[0, 0, 25] == 1 and out[0, ids.shape[1] - 1, 26] in (0, 1)
    assert out[2, 3, 26] == 1  # <sep> of "MA"


def test_descriptor_table_is_standardised():
    columns, table = descriptor_table()
    assert len(columns) == 66 == sum(n for _, n in DESCRIPTOR_SCALES) and len(set(columns)) == 66
    assert table.shape == (25, 66)
    letters = sorted("ACDEFGHIKLMNPQRSTVWYBZXUO")
    std = table[[letters.index(a) for a in STANDARD]]
    np.testing.assert_allclose(std.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(std.std(0), 1, atol=1e-5)
    row = {a: table[letters.index(a)] for a in letters}
    np.testing.assert_allclose(row["B"], (row["D"] + row["N"]) / 2, atol=1e-6)
    np.testing.assert_allclose(row["Z"], (row["E"] + row["Q"]) / 2, atol=1e-6)
    np.testing.assert_allclose(row["X"], 0, atol=1e-5)
    np.testing.assert_allclose(row["U"], row["C"])
    assert columns[:3] == ("PP1", "PP2", "PP3") and columns[3:13] == tuple(f"KF{i}" for i in range(1, 11))

    emb = DescriptorEmbedder()
    ids, mask = emb.tokenize(SEQS[:1], max_len=20)
    out = emb(ids, mask)
    assert emb.dim == 66 and out.shape == (1, 11, 66)
    np.testing.assert_allclose(out[0, 1].numpy(), row["M"])
    assert out[0, 0].abs().sum() == 0  # BOS


def test_learned_embedder_trains_and_is_not_cached(tmp_path):
    emb = LearnedEmbedder(8)
    assert not emb.frozen and emb.trainable
    ids, mask = emb.tokenize(SEQS, max_len=50)
    emb(ids, mask).sum().backward()
    assert emb.embedding.weight.grad is not None
    with pytest.raises(ConfigError):
        emb.embed_sequences(SEQS, max_len=50, cache=EmbeddingCache(tmp_path))
    assert [t.shape[0] for t in emb.embed_sequences(SEQS, max_len=50)] == [len(s) + 2 for s in SEQS]


class CountingOneHot(OneHotEmbedder):
    calls = 0

    def _embed(self, ids, mask):
        type(self).calls += ids.shape[0]
        return super()._embed(ids, mask)


def test_cache_hits_skip_the_model(tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    emb = CountingOneHot()
    CountingOneHot.calls = 0
    first = emb.embed_sequences(SEQS + [SEQS[0]], max_len=50, cache=cache, batch_size=2)
    assert CountingOneHot.calls == 3  # the duplicate is embedded once
    assert [t.shape for t in first] == [(len(s) + 2, 25) for s in SEQS + [SEQS[0]]]
    second = emb.embed_sequences(SEQS, max_len=50, cache=cache)
    assert CountingOneHot.calls == 3 and cache.hits == 3
    for a, b in zip(first, second, strict=False):
        torch.testing.assert_close(a, b)
    # The same output as a padded batch, cropped to each sequence.
    ids, mask = emb.tokenize(SEQS, max_len=50)
    full = emb(ids, mask)
    torch.testing.assert_close(second[1], full[1, : len(SEQS[1]) + 2])
    CountingOneHot.calls = 3
    # The end token and the embedder's settings are part of the key.
    no_end = emb.embed_sequences(SEQS[:1], max_len=50, add_end=False, cache=cache)
    assert no_end[0].shape[0] == len(SEQS[0]) + 1 and CountingOneHot.calls == 4
    assert OneHotEmbedder(special_channels=True).cache_key(SEQS[0]) != emb.cache_key(SEQS[0])
    files = list((tmp_path / "cache").rglob("*"))
    assert not [f for f in files if f.name.endswith(".tmp")]
    # A corrupt file is a miss and gets rewritten.
    key = emb.cache_key(SEQS[2])
    cache.path(key).write_bytes(b"garbage")
    emb.embed_sequences(SEQS[2:], max_len=50, cache=cache)
    assert CountingOneHot.calls == 5 and cache.get(key) is not None


def test_pad_embeddings():
    embs = [torch.ones(3, 4), torch.ones(5, 4)]
    emb, mask = pad_embeddings(embs)
    assert emb.shape == (2, 5, 4) and mask.sum(1).tolist() == [3, 5]
    assert emb[0, 3:].abs().sum() == 0
    assert pad_embeddings(embs, length=7)[0].shape == (2, 7, 4)
    with pytest.raises(InputError):
        pad_embeddings(embs, length=4)


# ---------------------------------------------------------------------------------------------- ESM-2


def test_esm2_fair_esm_local_checkpoint(tmp_path, write_tiny_esm2):
    path = tmp_path / "tiny_esm2.pt"
    ref = write_tiny_esm2(path)
    emb = build_embedder("esm2", path=path)
    assert emb.dim == 32 and emb.frozen and emb.source == "fair-esm"
    assert all(not p.requires_grad for p in emb.parameters())
    ids, mask = emb.tokenize(SEQS, max_len=50)
    out = emb(ids, mask)
    assert out.shape == (3, ids.shape[1], 32)
    # The same representation as fair-esm's own tokenization (<cls> seq <eos>) of each sequence.
    converter = ref.alphabet.get_batch_converter()
    for i, seq in enumerate(SEQS):
        _, _, toks = converter([("p", seq)])
        want = ref(toks, repr_layers=[1])["representations"][1][0]
        torch.testing.assert_close(out[i, : len(seq) + 2], want, atol=1e-5, rtol=1e-5)
    assert out[2, len(SEQS[2]) + 2 :].abs().sum() == 0  # padding
    # Cached embeddings equal the batch.
    got = emb.embed_sequences(SEQS, max_len=50, cache=EmbeddingCache(tmp_path / "c"))
    torch.testing.assert_close(got[1], out[1, : len(SEQS[1]) + 2])


def test_esm2_errors(tmp_path):
    with pytest.raises(InputError, match="never downloads"):
        build_embedder("esm2", path=tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(InputError, match="not a fair-esm checkpoint"):
        build_embedder("esm2", path=bad)
    folder = tmp_path / "hf"
    folder.mkdir()
    with pytest.raises(ProtlocError):
        build_embedder("esm2", path=folder)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
def test_esm2_transformers_folder(tmp_path):
    from transformers import EsmConfig, EsmModel

    from protloc.models.embedders import _ESM_VOCAB

    cfg = EsmConfig(
        vocab_size=33,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        pad_token_id=1,
        mask_token_id=32,
        position_embedding_type="rotary",
        token_dropout=True,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    ref = EsmModel(cfg, add_pooling_layer=False).eval()
    ref.save_pretrained(tmp_path / "esm")
    emb = build_embedder("esm2", path=tmp_path / "esm")
    assert emb.dim == 32 and emb.source == "transformers"
    ids, mask = emb.tokenize(SEQS[:1], max_len=50)
    vocab = {t: i for i, t in enumerate(_ESM_VOCAB)}
    toks = torch.tensor([[vocab["<cls>"]] + [vocab[a] for a in SEQS[0]] + [vocab["<eos>"]]])
    want = ref(input_ids=toks).last_hidden_state
    torch.testing.assert_close(emb(ids, mask), want, atol=1e-5, rtol=1e-5)


def test_esm_vocab_matches_fair_esm():
    esm = pytest.importorskip("esm")
    from protloc.models.embedders import _ESM_VOCAB

    assert list(_ESM_VOCAB) == esm.Alphabet.from_architecture("ESM-1b").all_toks


def test_tape_needs_local_weights_and_package(tmp_path):
    with pytest.raises(ConfigError, match="path"):
        build_embedder("tape")
    with pytest.raises(InputError):
        build_embedder("tape", path=tmp_path / "missing")
    if importlib.util.find_spec("tape") is None:
        with pytest.raises(ProtlocError, match="tape_proteins"):
            build_embedder("tape", path=tmp_path)
