"""Property-based tests (hypothesis) of the sequence parser, the FASTA reader / writer and the table reader.

Every reader either returns the data or raises :class:`protloc.errors.InputError`: no other exception
escapes, whatever the bytes.
"""

from __future__ import annotations

import re
import shutil
import string
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protloc.data.io import read_table, write_table
from protloc.data.sequences import ALPHABET, STANDARD, read_fasta, validate_sequence, write_fasta
from protloc.errors import InputError
from protloc.eval.fill import MASK_CHAR, parse_masked

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
residues = st.text(alphabet=ALPHABET + ALPHABET.lower(), min_size=1, max_size=200)
whitespace = st.text(alphabet=" \t\n\r", max_size=3)
ids = st.text(alphabet=string.ascii_letters + string.digits + "_.|-:", min_size=1, max_size=20)


_DIR = Path(tempfile.mkdtemp(prefix="protloc-hyp-"))


def _tmp() -> Path:
    """One folder for every example (they run one after another; each overwrites its file)."""
    return _DIR


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    shutil.rmtree(_DIR, ignore_errors=True)


# ------------------------------------------------------------------------------------------- sequences
@SETTINGS
@given(seq=residues, pads=st.lists(whitespace, min_size=2, max_size=2), stop=st.booleans())
def test_valid_sequences_normalise_to_upper_case_letters(seq: str, pads: list[str], stop: bool) -> None:
    raw = pads[0] + seq[: len(seq) // 2] + pads[1] + seq[len(seq) // 2 :] + ("*" if stop else "")
    assert validate_sequence(raw) == seq.upper()


@SETTINGS
@given(
    seq=residues,
    bad=st.characters(blacklist_categories=["Cs"]).filter(
        lambda c: (
            c.upper() not in ALPHABET and not c.isspace() and c.upper() == c.upper().strip() and len(c.upper()) == 1
        )
    ),
    at=st.integers(min_value=0),
)
def test_an_invalid_residue_is_named_with_its_position(seq: str, bad: str, at: int) -> None:
    i = at % (len(seq) + 1)
    raw = seq[:i] + bad + seq[i:]
    if raw.endswith("*") and bad == "*":  # a final '*' is a stop codon, not an error
        return
    with pytest.raises(InputError) as info:
        validate_sequence(raw, name="rec")
    msg = str(info.value)
    assert "'rec'" in msg and repr(bad.upper()) in msg
    assert re.search(rf"position {i + 1}\b", msg)


@SETTINGS
@given(seq=st.text(alphabet=STANDARD + MASK_CHAR, min_size=1, max_size=120))
def test_parse_masked_finds_every_mask(seq: str) -> None:
    placeholder, positions = parse_masked(seq)
    assert positions == [i for i, c in enumerate(seq) if c == MASK_CHAR]
    assert len(placeholder) == len(seq) and MASK_CHAR not in placeholder
    assert all(placeholder[i] == seq[i] for i in range(len(seq)) if i not in set(positions))


# ---------------------------------------------------------------------------------------------- FASTA
@SETTINGS
@given(records=st.dictionaries(ids, residues, min_size=1, max_size=8), width=st.integers(0, 80))
def test_fasta_round_trip(records: dict[str, str], width: int) -> None:
    path = _tmp() / "x.fasta"
    write_fasta(path, records, width=width)
    assert read_fasta(path) == {k: v.upper() for k, v in records.items()}


@SETTINGS
@given(text=st.text(max_size=400))
def test_fasta_reader_returns_or_names_the_problem(text: str) -> None:
    path = _tmp() / "x.fasta"
    path.write_text(text, encoding="utf-8")
    try:
        out = read_fasta(path)
    except InputError as exc:
        assert "x.fasta" in str(exc)
    else:
        assert all(validate_sequence(s) == s for s in out.values())


@SETTINGS
@given(data=st.binary(max_size=300))
def test_fasta_reader_survives_arbitrary_bytes(data: bytes) -> None:
    path = _tmp() / "x.fasta"
    path.write_bytes(data)
    try:
        read_fasta(path)
    except InputError as exc:
        assert "x.fasta" in str(exc)


# -------------------------------------------------------------------------------------------- tables
cells = st.text(alphabet=string.ascii_letters + string.digits + " ,;\"'-_.:/|", min_size=1, max_size=12).filter(
    lambda s: s.strip() == s and s != ""
)


@SETTINGS
@given(rows=st.lists(st.tuples(cells, cells, cells), min_size=1, max_size=10), sep=st.sampled_from(["csv", "tsv"]))
def test_table_round_trip_keeps_every_string(rows: list[tuple[str, str, str]], sep: str) -> None:
    df = pd.DataFrame(rows, columns=["fov_id", "protein_id", "path"])
    path = _tmp() / f"fovs.{sep}"
    write_table(df, path)
    got = read_table(path, required=("fov_id", "protein_id", "path"), dtype=str)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), df.astype(str), check_dtype=False)


@SETTINGS
@given(data=st.binary(max_size=300), required=st.booleans())
def test_table_reader_survives_arbitrary_bytes(data: bytes, required: bool) -> None:
    path = _tmp() / "fovs.csv"
    path.write_bytes(data)
    try:
        read_table(path, required=("fov_id", "protein_id", "path") if required else (), unique=())
    except InputError as exc:
        assert "fovs.csv" in str(exc)
