"""Tests for protloc.data.sequences: validation, tokenizer, cropping, FASTA."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from protloc.data.sequences import (
    ALPHABET,
    EXTENDED,
    STANDARD,
    FastaRecord,
    Tokenizer,
    crop_is_full_end,
    crop_sequence,
    iter_fasta,
    read_fasta,
    uniprot_accession,
    validate_sequence,
    write_fasta,
)
from protloc.errors import ConfigError, InputError

# --------------------------------------------------------------------------------------------------
# validation


def test_alphabet_constants():
    assert len(STANDARD) == 20 and len(set(STANDARD)) == 20
    assert EXTENDED == "BZXUO"
    assert ALPHABET == STANDARD + EXTENDED


def test_validate_normalises_case_whitespace_and_stop():
    assert validate_sequence(" mkv\nla \t") == "MKVLA"
    assert validate_sequence("MKVLA*") == "MKVLA"
    assert validate_sequence("mkbzxuo*") == "MKBZXUO"


def test_validate_reports_residue_position_and_name():
    seq = "M" * 16 + "J" + "A" * 5
    with pytest.raises(InputError) as exc:
        validate_sequence(seq, name="P12345")
    msg = str(exc.value)
    assert "'J'" in msg and "position 17" in msg and "'P12345'" in msg
    assert "B, Z, X, U, O" in msg


def test_validate_reports_first_of_several_and_counts_rest():
    with pytest.raises(InputError, match=r"'1' at position 3.*2 more"):
        validate_sequence("MK1-#A")


def test_validate_only_one_trailing_stop():
    with pytest.raises(InputError, match=r"'\*' at position 4"):
        validate_sequence("MKV**")
    with pytest.raises(InputError, match=r"'\*' at position 2"):
        validate_sequence("M*KV")


@pytest.mark.parametrize("seq", ["", "   ", "*", "\n*\n"])
def test_validate_empty(seq):
    with pytest.raises(InputError, match="empty"):
        validate_sequence(seq, name="x")


def test_validate_path_in_message(tmp_path):
    with pytest.raises(InputError) as exc:
        validate_sequence("MK-", name="a", path=tmp_path / "f.csv")
    assert str(exc.value).startswith(str(tmp_path / "f.csv"))


def test_validate_non_string():
    with pytest.raises(InputError, match="expected a string"):
        validate_sequence(None, name="a")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_vocab_layout():
    tok = Tokenizer()
    assert tok.vocab_size == len(tok) == 30
    assert (tok.pad_id, tok.mask_id, tok.cls_id, tok.sep_id, tok.unk_id) == (0, 1, 2, 3, 4)
    expected = "ABCDEFGHIKLMNOPQRSTUVWXYZ"
    assert [tok.vocab[c] for c in expected] == list(range(5, 30))
    assert tok.vocab["A"] == 5 and tok.vocab["O"] == 18 and tok.vocab["U"] == 24 and tok.vocab["Z"] == 29
    assert sorted(tok.vocab.values()) == list(range(30))


def test_encode_decode_round_trip():
    tok = Tokenizer()
    ids = tok.encode("MKV")
    assert ids.dtype == np.int64
    assert ids.tolist() == [2, tok.vocab["M"], tok.vocab["K"], tok.vocab["V"], 3]
    assert tok.decode(ids) == "MKV"
    assert tok.encode("MKV", add_special=False).tolist() == ids[1:-1].tolist()
    assert tok.encode("MKV", add_end=False).tolist() == ids[:-1].tolist()
    assert tok.encode("mkv*").tolist() == ids.tolist()
    rng = np.random.default_rng(0)
    seq = "".join(rng.choice(list(ALPHABET), 200))
    assert tok.decode(tok.encode(seq)) == seq


def test_decode_drops_specials_and_rejects_out_of_range():
    tok = Tokenizer()
    assert tok.decode([0, 1, 2, 5, 4, 29, 3, 0]) == "AZ"
    with pytest.raises(InputError, match="outside the vocabulary"):
        tok.decode([5, 30])


def test_encode_invalid_residue():
    with pytest.raises(InputError, match="'J' at position 2"):
        Tokenizer().encode("MJ")


def test_encode_batch_padding_and_mask():
    tok = Tokenizer()
    ids, mask = tok.encode_batch(["MKV", "A", "MKVLA"], max_len=5)
    assert ids.shape == mask.shape == (3, 7)
    assert ids.dtype == np.int64 and mask.dtype == bool
    assert mask.sum(axis=1).tolist() == [5, 3, 7]
    assert (ids[~mask] == tok.pad_id).all()
    assert ids[1].tolist() == [2, 5, 3, 0, 0, 0, 0]
    assert [tok.decode(r) for r in ids] == ["MKV", "A", "MKVLA"]


def test_encode_batch_add_end_per_sequence_and_no_special():
    tok = Tokenizer()
    ids, mask = tok.encode_batch(["MK", "MK"], max_len=2, add_end=[True, False])
    assert ids[0].tolist() == [2, tok.vocab["M"], tok.vocab["K"], 3]
    assert ids[1].tolist() == [2, tok.vocab["M"], tok.vocab["K"], 0]
    assert mask[1].tolist() == [True, True, True, False]
    ids, mask = tok.encode_batch(["MK", "A"], max_len=2, add_special=False)
    assert ids.tolist() == [[tok.vocab["M"], tok.vocab["K"]], [5, 0]]
    with pytest.raises(ConfigError):
        tok.encode_batch(["MK"], max_len=2, add_end=[True, False])


def test_encode_batch_rejects_too_long():
    with pytest.raises(InputError, match=r"sequence 1 has 6 residues.*max_len=5"):
        Tokenizer().encode_batch(["MK", "MKVLAG"], max_len=5)


def test_encode_batch_empty():
    ids, mask = Tokenizer().encode_batch([], max_len=5)
    assert ids.shape == (0, 0) and mask.shape == (0, 0)


# --------------------------------------------------------------------------------------------------
# cropping


def test_crop_short_sequences_untouched():
    for mode in ("start", "center", "end"):
        assert crop_sequence("MKVLA", 5, mode=mode) == ("MKVLA", 0)
    assert crop_sequence("MKVLA", 10, mode="random", rng=np.random.default_rng(0)) == ("MKVLA", 0)


def test_crop_deterministic_modes():
    seq = "ABCDEFGHIK"
    assert crop_sequence(seq, 4) == ("ABCD", 0)  # default: N-terminal window
    assert crop_sequence(seq, 4, mode="start") == ("ABCD", 0)
    assert crop_sequence(seq, 4, mode="center") == ("DEFG", 3)
    assert crop_sequence(seq, 4, mode="end") == ("FGHIK"[1:], 6)


def test_crop_random_seeded_and_uniform():
    seq = "".join(np.random.default_rng(1).choice(list(STANDARD), 50))
    a = [crop_sequence(seq, 10, mode="random", rng=np.random.default_rng(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(400):
        window, start = crop_sequence(seq, 10, mode="random", rng=rng)
        assert window == seq[start : start + 10] and len(window) == 10
        starts.add(start)
    assert starts == set(range(41))  # every start 0..40 reachable


def test_crop_errors():
    with pytest.raises(ConfigError, match="rng"):
        crop_sequence("MKVLA", 2, mode="random")
    with pytest.raises(ConfigError, match="unknown crop mode"):
        crop_sequence("MKVLA", 2, mode="middle")
    with pytest.raises(ConfigError):
        crop_sequence("MKVLA", 0)


def test_crop_is_full_end():
    seq = "A" * 1200
    assert not crop_is_full_end(seq, 0, 1000)
    assert crop_is_full_end(seq, 200, 1000)
    assert crop_is_full_end("A" * 10, 0, 1000)
    window, start = crop_sequence(seq, 1000, mode="end")
    assert crop_is_full_end(seq, start, 1000) and len(window) == 1000


# --------------------------------------------------------------------------------------------------
# FASTA


def test_fasta_round_trip_multiline(tmp_path):
    seqs = {"P1": "MKVLA" * 7, "sp|P12345|ABC_HUMAN": "ACDEFGHIKLMNPQRSTVWY", "x": "M"}
    path = write_fasta(tmp_path / "a.fasta", seqs, width=10)
    text = path.read_text()
    assert ">P1\nMKVLAMKVLA\n" in text
    assert max(len(line) for line in text.splitlines() if not line.startswith(">")) == 10
    assert read_fasta(path) == seqs
    assert list(read_fasta(path)) == list(seqs)  # file order kept


def test_fasta_single_line_and_records_with_description(tmp_path):
    recs = [FastaRecord("a", "first protein  OS=Homo", "MKV"), FastaRecord("b", "", "ACD")]
    path = write_fasta(tmp_path / "r.fa", recs, width=0)
    assert path.read_text() == ">a first protein OS=Homo\nMKV\n>b\nACD\n"
    got = list(iter_fasta(path))
    assert got == [FastaRecord("a", "first protein OS=Homo", "MKV"), FastaRecord("b", "", "ACD")]


def test_fasta_gzip_round_trip(tmp_path):
    seqs = {"a": "MKVLA" * 30, "b": "ACDEF"}
    path = write_fasta(tmp_path / "s.fasta.gz", seqs)
    with open(path, "rb") as fh:
        assert fh.read(2) == b"\x1f\x8b"
    assert read_fasta(path) == seqs
    # gzip detected by content, not only by suffix; and output is reproducible
    plain_named = tmp_path / "s.fasta"
    plain_named.write_bytes(path.read_bytes())
    assert read_fasta(plain_named) == seqs
    again = write_fasta(tmp_path / "t.fasta.gz", seqs)
    assert again.read_bytes() == path.read_bytes()


def test_fasta_reading_normalises(tmp_path):
    path = tmp_path / "in.fa"
    path.write_text("\n>a some desc\nmkv la\n\nGG*\n>b\r\nAC\r\n")
    assert read_fasta(path) == {"a": "MKVLAGG", "b": "AC"}
    assert read_fasta(path, validate=False) == {"a": "mkvlaGG*", "b": "AC"}


def test_fasta_uniprot_header(tmp_path):
    path = tmp_path / "u.fa"
    path.write_text(">sp|P12345|NAME_HUMAN Some protein OS=Homo sapiens\nMKV\n")
    (rec,) = list(iter_fasta(path))
    assert rec.id == "sp|P12345|NAME_HUMAN"
    assert rec.description.startswith("Some protein")
    assert uniprot_accession(rec.id) == "P12345"


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("sp|P12345|NAME_HUMAN", "P12345"),
        ("tr|A0A024R161|A0A024R161_HUMAN", "A0A024R161"),
        ("Q9Y6K9-2", "Q9Y6K9-2"),
        ("O43657", "O43657"),
        ("ENSG00000141510", None),
        ("TP53", None),
        ("sp|notanacc|X", None),
    ],
)
def test_uniprot_accession(token, expected):
    assert uniprot_accession(token) == expected


def test_fasta_empty_file(tmp_path):
    path = tmp_path / "empty.fa"
    path.write_text("")
    with pytest.raises(InputError, match="no FASTA records") as exc:
        read_fasta(path)
    assert str(path) in str(exc.value)
    path.write_text("\n\n  \n")
    with pytest.raises(InputError, match="no FASTA records"):
        read_fasta(path)


def test_fasta_duplicate_id(tmp_path):
    path = tmp_path / "dup.fa"
    path.write_text(">a\nMK\n>b\nMK\n>a desc\nMV\n")
    with pytest.raises(InputError) as exc:
        read_fasta(path)
    msg = str(exc.value)
    assert "duplicate record id 'a'" in msg and "line 5" in msg and "line 1" in msg


def test_fasta_text_before_header(tmp_path):
    path = tmp_path / "bad.fa"
    path.write_text("MKVLA\n>a\nMK\n")
    with pytest.raises(InputError, match=r"line 1.*before the first FASTA header"):
        read_fasta(path)


def test_fasta_empty_record(tmp_path):
    path = tmp_path / "e.fa"
    path.write_text(">a\nMK\n>b\n>c\nMV\n")
    with pytest.raises(InputError, match=r"line 3.*record 'b' has no sequence"):
        read_fasta(path)
    path.write_text(">a\nMK\n>b\n")
    with pytest.raises(InputError, match="record 'b' has no sequence"):
        list(iter_fasta(path))
    path.write_text(">\nMK\n")
    with pytest.raises(InputError, match="without a record id"):
        read_fasta(path)


def test_fasta_invalid_residue_names_file_record_position_line(tmp_path):
    path = tmp_path / "inv.fa"
    path.write_text(">ok\nMKV\n>P12345 desc\nMKVLA\nMKJLA\n")
    with pytest.raises(InputError) as exc:
        read_fasta(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert "'P12345'" in msg and "'J'" in msg and "position 8" in msg and "line 5" in msg
    assert read_fasta(path, validate=False)["P12345"] == "MKVLAMKJLA"


def test_fasta_missing_file(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        read_fasta(tmp_path / "nope.fa")


def test_write_fasta_errors_leave_no_file(tmp_path):
    out = tmp_path / "o.fa"
    with pytest.raises(InputError, match="'b'.*'J'"):
        write_fasta(out, {"a": "MK", "b": "MJ"})
    with pytest.raises(InputError, match="invalid FASTA record id"):
        write_fasta(out, {"a b": "MK"})
    with pytest.raises(InputError, match="duplicate"):
        write_fasta(out, [FastaRecord("a", "", "MK"), FastaRecord("a", "", "MV")])
    assert list(tmp_path.iterdir()) == []


def test_write_fasta_replaces_atomically(tmp_path):
    out = tmp_path / "o.fa"
    write_fasta(out, {"a": "MK"})
    write_fasta(out, {"b": "MV"})
    assert read_fasta(out) == {"b": "MV"}
    assert [p.name for p in tmp_path.iterdir()] == ["o.fa"]


def test_gzip_written_by_others_is_read(tmp_path):
    path = tmp_path / "x.fa.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(">a\nMKV\nLA\n")
    assert read_fasta(path) == {"a": "MKVLA"}
