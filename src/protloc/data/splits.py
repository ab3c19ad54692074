"""Train / validation / test splits: random, by field of view, and homology-aware.

- CELL-E splits OpenCell *by protein*, 80 % train / 20 % validation (CELL-E paper, S.3.1), so a model
  never sees the sequence or images of a validation protein.
- cytoself splits *by field of view* 8:1:1 (cytoself paper, Methods): every protein appears in every
  split, because the protein identity is the label cytoself learns, while all crops of one field of
  view stay together so near-duplicate neighbouring cells do not leak across splits.
- The homology-aware split clusters sequences at an identity threshold, requiring the alignment to
  cover 80 % of the shorter sequence (CELL-E S.3.2, following the PSI-CD-HIT procedure of the
  DeepLoc benchmark), and assigns whole clusters to splits.

Every split is deterministic for a given seed and does not depend on the order of the input ids.
"""

from __future__ import annotations

import logging
import math
import shutil
import subprocess
import tempfile
import zlib
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from protloc.data.sequences import ALPHABET, validate_sequence
from protloc.errors import ConfigError, InputError, ProtlocError

__all__ = [
    "SPLIT_NAMES",
    "CELLE_FRACTIONS",
    "CYTOSELF_FRACTIONS",
    "CYTOSELF_REFERENCE_FRACTIONS",
    "CLUSTER_BACKENDS",
    "split_items",
    "split_by_protein",
    "split_by_fov",
    "cluster_sequences",
    "cdhit_word_size",
    "HomologySplit",
    "homology_split",
    "assign_splits",
]

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")

#: CELL-E: random split by protein, 80 % training / 20 % validation (paper S.3.1).
CELLE_FRACTIONS = {"train": 0.8, "val": 0.2}
#: cytoself: split by field of view, train:validation:test = 8:1:1 (paper, Methods).
CYTOSELF_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
#: What the cytoself reference code uses: ``data_split=(0.82, 0.098, 0.082)`` is the default of its
#: OpenCell data manager (royerlab/cytoself, ``cytoself/datamanager/opencell.py``). This disagrees
#: with the paper's 8:1:1; the paper value is our default and this preset is kept for reproducing the
#: released models.
CYTOSELF_REFERENCE_FRACTIONS = {"train": 0.82, "val": 0.098, "test": 0.082}

CLUSTER_BACKENDS = ("auto", "cd-hit", "mmseqs", "python")

_FRACTION_TOL = 1e-6


# --------------------------------------------------------------------------------------------------
# random splits


def _check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    """Validate split fractions; return them in :data:`SPLIT_NAMES` order, normalised to sum 1."""
    if not isinstance(fractions, Mapping) or not fractions:
        raise ConfigError(f"split fractions must be a non-empty mapping of split name -> fraction, got {fractions!r}")
    unknown = [k for k in fractions if k not in SPLIT_NAMES]
    if unknown:
        raise ConfigError(f"unknown split name(s) {unknown}; allowed: {', '.join(SPLIT_NAMES)}")
    out: dict[str, float] = {}
    for name in SPLIT_NAMES:
        if name not in fractions:
            continue
        value = fractions[name]
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"split fraction {name}={value!r} is not a number") from None
        if not math.isfinite(f) or f <= 0:
            raise ConfigError(f"split fraction {name}={value!r} must be > 0 (leave the split out instead)")
        out[name] = f
    total = sum(out.values())
    if abs(total - 1.0) > _FRACTION_TOL:
        raise ConfigError(f"split fractions must sum to 1, got {total:.6g} ({out})")
    return {k: v / total for k, v in out.items()}


def _target_counts(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Items per split: largest-remainder rounding, so counts sum to ``n``.

    With ``n >= len(fractions)`` every split gets at least one item (taken from the largest split).
    """
    names = list(fractions)
    raw = {s: fractions[s] * n for s in names}
    # The epsilon keeps 0.29 * 100 = 28.999999999999996 from rounding down.
    counts = {s: int(math.floor(raw[s] + 1e-9)) for s in names}
    rem = n - sum(counts.values())
    by_remainder = sorted(names, key=lambda s: (-(raw[s] - counts[s]), SPLIT_NAMES.index(s)))
    i = 0
    while rem > 0:
        counts[by_remainder[i % len(names)]] += 1
        rem -= 1
        i += 1
    while rem < 0:  # only through floating-point noise
        largest = max(names, key=lambda s: counts[s])
        counts[largest] -= 1
        rem += 1
    if n >= len(names):
        for s in names:
            if counts[s] == 0:
                donor = max(names, key=lambda t: (counts[t], -SPLIT_NAMES.index(t)))
                counts[donor] -= 1
                counts[s] += 1
    return counts


def _is_missing(x: object) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _unique_sorted(ids: Sequence[Hashable], *, what: str) -> list:
    for k, x in enumerate(ids):
        if _is_missing(x):
            raise InputError(f"missing {what} (got {x!r})", row=k)
    # Sorting first makes the split independent of the input order; the type name breaks ties
    # between e.g. 1 and "1".
    return sorted(set(ids), key=lambda x: (str(x), type(x).__name__))


def split_items(
    ids: Sequence[Hashable],
    *,
    fractions: Mapping[str, float],
    seed: int = 0,
) -> dict:
    """Randomly assign unique ids to splits.

    The unique ids are sorted, shuffled with ``numpy.random.default_rng(seed)`` and cut into
    consecutive runs of the target sizes (largest-remainder rounding of ``fraction * n``, so the counts
    add up to ``n``; with at least as many ids as splits, every split gets at least one id).

    Parameters
    ----------
    ids
        Items to split; repeated ids count once.
    fractions
        ``{split name: fraction}`` over :data:`SPLIT_NAMES`, positive, summing to 1.
    seed
        Seed of the shuffle.

    Returns
    -------
    dict
        ``{id: split name}`` in sorted id order.

    Raises
    ------
    ConfigError
        For invalid fractions.
    InputError
        For a missing (None / NaN) id.
    """
    fr = _check_fractions(fractions)
    uniq = _unique_sorted(ids, what="id")
    counts = _target_counts(len(uniq), fr)
    perm = np.random.default_rng(seed).permutation(len(uniq))
    assigned: dict = {}
    k = 0
    for name, c in counts.items():
        for idx in perm[k : k + c]:
            assigned[uniq[idx]] = name
        k += c
    logger.debug("split %d ids: %s", len(uniq), counts)
    return {x: assigned[x] for x in uniq}


def split_by_protein(
    protein_ids: Sequence[Hashable],
    *,
    fractions: Mapping[str, float] = CELLE_FRACTIONS,
    seed: int = 0,
) -> dict:
    """Split proteins so that no protein is in two splits (CELL-E, paper S.3.1: 80 / 20 by protein).

    Every image of a protein then follows its protein's split, so a validation protein's sequence
    and images are never seen in training. See :func:`split_items` for the procedure.

    Returns
    -------
    dict
        ``{protein_id: split}``.
    """
    return split_items(protein_ids, fractions=fractions, seed=seed)


def split_by_fov(
    fov_ids: Sequence[Hashable],
    *,
    protein_ids: Sequence[Hashable] | None = None,
    fractions: Mapping[str, float] = CYTOSELF_FRACTIONS,
    seed: int = 0,
) -> dict:
    """Split fields of view (cytoself, paper Methods: 8:1:1).

    All crops of one field of view share a split, so neighbouring, overlapping or near-identical
    cells never sit on both sides. Proteins are *not* held out: the protein identity is the label
    cytoself learns, so every protein should appear in every split.

    Parameters
    ----------
    fov_ids
        One id per crop or per field of view; repeats count once.
    protein_ids
        Optional, parallel to ``fov_ids``: the protein of each entry. When given, the fields of view
        of each protein are split separately (as the cytoself reference code does), so every protein
        with at least as many fields of view as there are splits is present in every split. Without
        it, fields of view are split globally and a protein with few of them may miss a split.
    fractions
        Target fractions of fields of view, default 8:1:1. (The reference code balances crop counts
        rather than field-of-view counts; with similar crops per field the two agree.)
    seed
        Seed of the shuffle.

    Returns
    -------
    dict
        ``{fov_id: split}``.

    Raises
    ------
    InputError
        If ``protein_ids`` has another length than ``fov_ids``, or one field of view is listed under
        two proteins.
    """
    if protein_ids is None:
        return split_items(fov_ids, fractions=fractions, seed=seed)
    fovs, proteins = list(fov_ids), list(protein_ids)
    if len(fovs) != len(proteins):
        raise InputError(f"{len(fovs)} fov ids but {len(proteins)} protein ids")
    fr = _check_fractions(fractions)
    protein_of: dict = {}
    for row, (fov, prot) in enumerate(zip(fovs, proteins, strict=True)):
        if _is_missing(fov) or _is_missing(prot):
            raise InputError(f"missing fov or protein id ({fov!r}, {prot!r})", row=row)
        if protein_of.setdefault(fov, prot) != prot:
            raise InputError(
                f"field of view {fov!r} belongs to two proteins: {protein_of[fov]!r} and {prot!r}", row=row
            )
    by_protein: dict = {}
    for fov, prot in protein_of.items():
        by_protein.setdefault(prot, []).append(fov)
    out: dict = {}
    for prot, its_fovs in by_protein.items():
        # A per-protein seed that depends only on (seed, protein name): adding or removing another
        # protein does not reshuffle this one.
        sub = int(np.random.SeedSequence([seed, zlib.crc32(repr(prot).encode())]).generate_state(1)[0])
        out.update(split_items(its_fovs, fractions=fr, seed=sub))
    return {f: out[f] for f in _unique_sorted(list(out), what="fov id")}


# --------------------------------------------------------------------------------------------------
# sequence clustering


def cdhit_word_size(identity: float) -> int:
    """CD-HIT word size ``-n`` for a protein identity threshold (CD-HIT user's guide).

    5 for 0.7-1.0, 4 for 0.6-0.7, 3 for 0.5-0.6, 2 for 0.4-0.5. CD-HIT cannot cluster proteins below
    0.4 identity (the guide points to PSI-CD-HIT there).
    """
    if identity >= 0.7:
        return 5
    if identity >= 0.6:
        return 4
    if identity >= 0.5:
        return 3
    if identity >= 0.4:
        return 2
    raise ConfigError(
        f"cd-hit cannot cluster proteins below 0.4 identity (got {identity}); "
        "use backend='mmseqs' (MMseqs2) or backend='python'"
    )


def _resolve_backend(backend: str, identity: float) -> str:
    if backend not in CLUSTER_BACKENDS:
        raise ConfigError(f"unknown clustering backend {backend!r}; choose one of {', '.join(CLUSTER_BACKENDS)}")
    if backend == "auto":
        if identity >= 0.4 and shutil.which("cd-hit"):
            return "cd-hit"
        if shutil.which("mmseqs"):
            return "mmseqs"
        return "python"
    if backend == "cd-hit":
        cdhit_word_size(identity)  # raises below 0.4
        if not shutil.which("cd-hit"):
            raise ProtlocError(
                "cd-hit not found on PATH: install it (Debian/Ubuntu: apt-get install cd-hit; "
                "conda: bioconda::cd-hit) or use backend='python'"
            )
    if backend == "mmseqs" and not shutil.which("mmseqs"):
        raise ProtlocError(
            "mmseqs not found on PATH: install MMseqs2 (Debian/Ubuntu: apt-get install mmseqs2; "
            "conda: bioconda::mmseqs2) or use backend='python'"
        )
    return backend


def _run_tool(cmd: list[str], *, tool: str, cwd: Path) -> None:
    logger.debug("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, errors="replace", check=False)
    except OSError as exc:
        raise ProtlocError(f"could not run {tool}: {exc}") from exc
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
        tail = " | ".join(lines[-6:]) or "(no output)"
        raise ProtlocError(f"{tool} failed with exit status {proc.returncode}: {' '.join(cmd)}: {tail}")


def _write_indexed_fasta(path: Path, seqs: list[str]) -> None:
    # Records are named s0, s1, ... so that ids with '|', spaces or '...' survive the tools'
    # header truncation and the .clstr format unambiguously.
    with open(path, "w", encoding="ascii") as fh:
        for i, s in enumerate(seqs):
            fh.write(f">s{i}\n{s}\n")


def _cluster_cdhit(seqs: list[str], *, identity: float, coverage: float, threads: int) -> list[int]:
    n_word = cdhit_word_size(identity)
    with tempfile.TemporaryDirectory(prefix="protloc-cdhit-") as tmp:
        d = Path(tmp)
        _write_indexed_fasta(d / "in.fasta", seqs)
        cmd = [
            "cd-hit",
            "-i",
            "in.fasta",
            "-o",
            "out",
            "-c",
            f"{identity:g}",
            # -G 1 (default): identity = identical residues / full length of the shorter sequence.
            "-G",
            "1",
            # CELL-E S.3.2: the alignment must cover >= 80 % of the shorter sequence.
            "-aS",
            f"{coverage:g}",
            "-n",
            str(n_word),
            # Default -l 10 silently drops sequences of <= 10 residues; keep all that have a word.
            "-l",
            str(n_word - 1),
            "-M",
            "0",
            "-T",
            str(threads),
            "-d",
            "0",
        ]
        _run_tool(cmd, tool="cd-hit", cwd=d)
        rep = _parse_clstr(d / "out.clstr", len(seqs))
    return rep


def _parse_clstr(path: Path, n: int) -> list[int]:
    """Representative index per sequence from a CD-HIT ``.clstr`` file (-1 where absent)."""
    rep = [-1] * n
    members: list[int] = []
    rep_of_cluster: int | None = None

    def flush() -> None:
        if members:
            r = rep_of_cluster if rep_of_cluster is not None else members[0]
            for m in members:
                rep[m] = r

    with open(path, encoding="ascii", errors="replace") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            if line.startswith(">Cluster"):
                flush()
                members, rep_of_cluster = [], None
                continue
            # "0\t300aa, >s12... *"  or  "1\t280aa, >s3... at 91.07%"
            start = line.find(">s")
            stop = line.find("...", start)
            if start < 0 or stop < 0:
                raise ProtlocError(f"cannot parse cd-hit cluster file line: {line!r}")
            idx = int(line[start + 2 : stop])
            members.append(idx)
            if line.endswith("*"):
                rep_of_cluster = idx
    flush()
    return rep


def _cluster_mmseqs(seqs: list[str], *, identity: float, coverage: float, threads: int) -> list[int]:
    with tempfile.TemporaryDirectory(prefix="protloc-mmseqs-") as tmp:
        d = Path(tmp)
        _write_indexed_fasta(d / "in.fasta", seqs)
        cmd = [
            "mmseqs",
            "easy-cluster",
            "in.fasta",
            "out",
            "work",
            "--min-seq-id",
            f"{identity:g}",
            # Identity over the shorter sequence, as CD-HIT's default (-G 1).
            "--seq-id-mode",
            "1",
            # Greedy incremental clustering by length (CD-HIT's algorithm): the representative is
            # the longer sequence (the query) and each member a target, so coverage of the target
            # (--cov-mode 1) is coverage of the shorter sequence, i.e. CD-HIT's -aS (MMseqs2 wiki,
            # "How to set the right alignment coverage to cluster"; soedinglab/MMseqs2#104).
            "--cluster-mode",
            "2",
            "--cov-mode",
            "1",
            "-c",
            f"{coverage:g}",
            "--threads",
            str(max(threads, 1)),
            "-v",
            "1",
        ]
        _run_tool(cmd, tool="mmseqs", cwd=d)
        rep = [-1] * len(seqs)
        with open(d / "out_cluster.tsv", encoding="ascii") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) != 2:
                    continue
                rep[int(parts[1][1:])] = int(parts[0][1:])
    return rep


# ---- pure-Python backend ---------------------------------------------------------------------------

# BLOSUM62 (Henikoff & Henikoff 1992), the NCBI table; CD-HIT and BLAST score proteins with it,
# with gap open 11 / extend 1.
_BLOSUM62_TEXT = """
   A  R  N  D  C  Q  E  G  H  I  L  K  M  F  P  S  T  W  Y  V  B  Z  X
A  4 -1 -2 -2  0 -1 -1  0 -2 -1 -1 -1 -1 -2 -1  1  0 -3 -2  0 -2 -1  0
R -1  5  0 -2 -3  1  0 -2  0 -3 -2  2 -1 -3 -2 -1 -1 -3 -2 -3 -1  0 -1
N -2  0  6  1 -3  0  0  0  1 -3 -3  0 -2 -3 -2  1  0 -4 -2 -3  3  0 -1
D -2 -2  1  6 -3  0  2 -1 -1 -3 -4 -1 -3 -3 -1  0 -1 -4 -3 -3  4  1 -1
C  0 -3 -3 -3  9 -3 -4 -3 -3 -1 -1 -3 -1 -2 -3 -1 -1 -2 -2 -1 -3 -3 -2
Q -1  1  0  0 -3  5  2 -2  0 -3 -2  1  0 -3 -1  0 -1 -2 -1 -2  0  3 -1
E -1  0  0  2 -4  2  5 -2  0 -3 -3  1 -2 -3 -1  0 -1 -3 -2 -2  1  4 -1
G  0 -2  0 -1 -3 -2 -2  6 -2 -4 -4 -2 -3 -3 -2  0 -2 -2 -3 -3 -1 -2 -1
H -2  0  1 -1 -3  0  0 -2  8 -3 -3 -1 -2 -1 -2 -1 -2 -2  2 -3  0  0 -1
I -1 -3 -3 -3 -1 -3 -3 -4 -3  4  2 -3  1  0 -3 -2 -1 -3 -1  3 -3 -3 -1
L -1 -2 -3 -4 -1 -2 -3 -4 -3  2  4 -2  2  0 -3 -2 -1 -2 -1  1 -4 -3 -1
K -1  2  0 -1 -3  1  1 -2 -1 -3 -2  5 -1 -3 -1  0 -1 -3 -2 -2  0  1 -1
M -1 -1 -2 -3 -1  0 -2 -3 -2  1  2 -1  5  0 -2 -1 -1 -1 -1  1 -3 -1 -1
F -2 -3 -3 -3 -2 -3 -3 -3 -1  0  0 -3  0  6 -4 -2 -2  1  3 -1 -3 -3 -1
P -1 -2 -2 -1 -3 -1 -1 -2 -2 -3 -3 -1 -2 -4  7 -1 -1 -4 -3 -2 -2 -1 -2
S  1 -1  1  0 -1  0  0  0 -1 -2 -2  0 -1 -2 -1  4  1 -3 -2 -2  0  0  0
T  0 -1  0 -1 -1 -1 -1 -2 -2 -1 -1 -1 -1 -2 -1  1  5 -2 -2  0 -1 -1  0
W -3 -3 -4 -4 -2 -2 -3 -2 -2 -3 -2 -3 -1  1 -4 -3 -2 11  2 -3 -4 -3 -2
Y -2 -2 -2 -3 -2 -1 -2 -3  2 -1 -1 -2 -1  3 -3 -2 -2  2  7 -1 -3 -2 -1
V  0 -3 -3 -3 -1 -2 -2 -3 -3  3  1 -2  1 -1 -2 -2  0 -3 -1  4 -3 -2 -1
B -2 -1  3  4 -3  0  1 -1  0 -3 -4  0 -3 -3 -2  0 -1 -4 -3 -3  4  1 -1
Z -1  0  0  1 -3  3  4 -2  0 -3 -3  1 -1 -3 -1  0 -1 -3 -2 -2  1  4 -1
X  0 -1 -1 -1 -2 -1 -1 -1 -1 -1 -1 -1 -1 -1 -2  0  0 -2 -1 -1 -1 -1 -1
"""
_GAP_OPEN = 11  # cost of a gap of length 1
_GAP_EXTEND = 1  # cost of each further gap position
_BAND = 20  # half band width of the banded alignment (CD-HIT's -b default)
# A homolog at identity t shares about (L - k + 1) * t**k identical k-mers with its representative
# when substitutions are spread at random; pairs with fewer than this fraction of that number of
# word hits on their best diagonal band are not aligned. Like CD-HIT's short-word filter this is a
# statistical, not a worst-case, bound.
_KMER_TOLERANCE = 0.5
_NEG = np.int64(-(1 << 60))


def _blosum_alphabet_matrix() -> np.ndarray:
    """BLOSUM62 over :data:`ALPHABET` order; U scored as C (selenocysteine), O as K (pyrrolysine)."""
    rows = [ln.split() for ln in _BLOSUM62_TEXT.strip().splitlines()]
    cols = rows[0]
    table = {r[0]: dict(zip(cols, map(int, r[1:]), strict=True)) for r in rows[1:]}
    proxy = {"U": "C", "O": "K"}
    n = len(ALPHABET)
    mat = np.zeros((n, n), dtype=np.int64)
    for i, a in enumerate(ALPHABET):
        for j, b in enumerate(ALPHABET):
            mat[i, j] = table[proxy.get(a, a)][proxy.get(b, b)]
    return mat


_BLOSUM = _blosum_alphabet_matrix()
_CODE_LUT = np.full(256, -1, dtype=np.int64)
for _i, _c in enumerate(ALPHABET):
    _CODE_LUT[ord(_c)] = _i
_SENTINEL = len(ALPHABET)  # code of "outside the representative" in alignment strips


def _codes(seq: str) -> np.ndarray:
    return _CODE_LUT[np.frombuffer(seq.encode("ascii"), dtype=np.uint8)]


def _kmers(codes: np.ndarray, k: int) -> np.ndarray:
    if codes.size < k:
        return np.zeros(0, dtype=np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(codes, k)
    return windows @ (len(ALPHABET) ** np.arange(k - 1, -1, -1, dtype=np.int64))


def _align_band(
    query: np.ndarray, strips: np.ndarray, packed: np.ndarray, *, base: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Banded Smith-Waterman (BLOSUM62, affine gaps) of one query against R representatives at once.

    Cell values pack ``score * base**2 + identities * base + start_code`` into one int64, so a plain
    max over the recurrence maximises the score, then the number of identical residues, then the
    coverage -- and carries the identity count and the alignment start along without a traceback.

    Parameters
    ----------
    query
        Residue codes of the query (the shorter sequence), length m; the rows of the DP.
    strips
        ``[R, m + width - 1]`` residue codes of each representative along its band: row ``i`` of the
        DP sees ``strips[:, i : i + width]``; :data:`_SENTINEL` marks columns outside the sequence.
    packed
        ``[26, 26]`` packed substitution values (:data:`_SENTINEL` row/column = -inf).
    base
        Packing base, > m + 1.
    width
        Band width (2 * half band + 1).

    Returns
    -------
    identities, start, end : numpy.ndarray
        Per representative: identical aligned residues, first and last aligned query position.
    """
    m = query.size
    r = strips.shape[0]
    b2 = base * base
    go, ge = _GAP_OPEN * b2, _GAP_EXTEND * b2
    ge_ramp = ge * np.arange(width, dtype=np.int64)
    e_shift = ge_ramp[1:] + (go - ge)
    # Before row 0 every cell holds the empty alignment starting at query row 0 (start code base-1).
    h = np.full((r, width), base - 1, dtype=np.int64)
    f = np.full((r, width), _NEG, dtype=np.int64)
    e = np.full((r, width), _NEG, dtype=np.int64)
    best = np.full(r, -1, dtype=np.int64)
    end = np.zeros(r, dtype=np.int64)
    for i in range(m):
        win = strips[:, i : i + width]
        # Vertical move (query residue against a gap): from (i-1, j), band index b+1 of the last row.
        f_new = np.empty_like(f)
        np.maximum(h[:, 1:] - go, f[:, 1:] - ge, out=f_new[:, :-1])
        f_new[:, -1] = _NEG
        t = h + packed[query[i]][win]  # diagonal: same band index
        np.maximum(t, f_new, out=t)
        # Local alignment: restart with an empty alignment whose first residue is row i + 1. Cells
        # outside the representative get exactly this value (their substitution score is -inf and
        # gaps only lower it), so an alignment can start at its first residue from any query row;
        # cells past its end only ever hold values below the best already seen.
        np.maximum(t, base - 2 - i, out=t)
        # Horizontal move (representative residue against a gap) within the row, all at once:
        # E[b] = max_{k<b} T[k] - go - ge * (b - k - 1); a gap opened from a gap is never better.
        u = np.maximum.accumulate(t + ge_ramp, axis=1)
        e[:, 1:] = u[:, :-1] - e_shift
        h = np.maximum(t, e)
        f = f_new
        row_best = h.max(axis=1)
        better = row_best > best
        best[better] = row_best[better]
        end[better] = i
    rem = np.mod(best, b2)
    identities = rem // base
    start = base - 1 - rem % base
    return identities, start, end


def _cluster_python(seqs: list[str], *, identity: float, coverage: float) -> list[int]:
    """Greedy incremental clustering as CD-HIT does it, in NumPy.

    Sequences are taken longest first; each joins the first (longest) representative with
    ``identical residues / length of the shorter sequence >= identity`` over a local alignment that
    covers ``>= coverage`` of the shorter sequence, or becomes a new representative. Identity over
    the shorter sequence is CD-HIT's default definition (``-G 1``). A k-mer filter (word size as
    CD-HIT's ``-n``, at least 3) skips pairs with too few shared words on their best diagonal band,
    and the alignment is a banded Smith-Waterman around that band (CD-HIT's ``-b 20``). Sequences
    shorter than the word size have no words and stay singletons.
    """
    n = len(seqs)
    if n == 0:
        return []
    # CD-HIT's word sizes, but never below 3: 2-mers are so common (400 of them) that random pairs
    # pass the filter and everything gets aligned; 3-mer hits still separate homologs at 0.4.
    k = max(cdhit_word_size(identity), 3) if identity >= 0.4 else 3
    width = 2 * _BAND + 1
    codes = [_codes(s) for s in seqs]
    lengths = np.array([c.size for c in codes], dtype=np.int64)
    max_len = int(lengths.max())
    base = 1 << int(max_len + 2).bit_length()
    packed = np.full((_SENTINEL + 1, _SENTINEL + 1), _NEG, dtype=np.int64)
    packed[:_SENTINEL, :_SENTINEL] = _BLOSUM * base * base + np.eye(_SENTINEL, dtype=np.int64) * base

    # Global k-mer index over all sequences: (kmer, sequence, position) sorted by kmer.
    kmer_lists = [_kmers(c, k) for c in codes]
    all_kmer = np.concatenate(kmer_lists)
    all_seq = np.concatenate([np.full(km.size, i, dtype=np.int64) for i, km in enumerate(kmer_lists)])
    all_pos = np.concatenate([np.arange(km.size, dtype=np.int64) for km in kmer_lists])
    order = np.argsort(all_kmer, kind="stable")
    all_kmer, all_seq, all_pos = all_kmer[order], all_seq[order], all_pos[order]

    # Longest first; ties by input order (the caller sorts ids, so this is deterministic).
    process = sorted(range(n), key=lambda i: (-lengths[i], i))
    rep_of = np.full(n, -1, dtype=np.int64)
    rank = np.full(n, -1, dtype=np.int64)  # creation order of representatives
    is_rep = np.zeros(n, dtype=bool)
    n_reps = 0
    # Diagonal histograms are dense [reps, diagonals]; process representatives in chunks to bound memory.
    max_cells = 4_000_000
    for q in process:
        qk = kmer_lists[q]
        m = int(lengths[q])
        candidates = np.zeros(0, dtype=np.int64)
        diags = np.zeros(0, dtype=np.int64)
        if qk.size and n_reps:
            lo = np.searchsorted(all_kmer, qk, side="left")
            hi = np.searchsorted(all_kmer, qk, side="right")
            cnt = hi - lo
            total = int(cnt.sum())
            if total:
                offsets = np.cumsum(cnt) - cnt
                idx = np.repeat(lo - offsets, cnt) + np.arange(total)
                hit_seq = all_seq[idx]
                keep = is_rep[hit_seq]
                hit_seq = hit_seq[keep]
                hit_diag = all_pos[idx][keep] - np.repeat(np.arange(qk.size), cnt)[keep]
                required = max(1, int(_KMER_TOLERANCE * qk.size * identity**k))
                # Cheap first cut: total word hits bound the hits on any one band.
                per_rep = np.bincount(hit_seq, minlength=n)
                hopeful = np.flatnonzero(per_rep >= required)
                if hopeful.size:
                    candidates, diags = _best_bands(
                        hit_seq,
                        hit_diag,
                        hopeful,
                        m=m,
                        max_len=max_len,
                        width=width,
                        required=required,
                        max_cells=max_cells,
                    )
        joined = -1
        if candidates.size:
            ordering = np.argsort(rank[candidates], kind="stable")
            candidates, diags = candidates[ordering], diags[ordering]
            strips = np.full((candidates.size, m + width - 1), _SENTINEL, dtype=np.int64)
            for row, (c, d) in enumerate(zip(candidates.tolist(), diags.tolist(), strict=True)):
                off = d - _BAND  # strip column t holds representative position off + t
                a, b = max(off, 0), min(off + m + width - 1, int(lengths[c]))
                if a < b:
                    strips[row, a - off : b - off] = codes[c][a:b]
            ident, start, end = _align_band(codes[q], strips, packed, base=base, width=width)
            ok = (ident >= identity * m - 1e-9) & ((end - start + 1) >= coverage * m - 1e-9) & (ident > 0)
            hits = np.flatnonzero(ok)
            if hits.size:
                joined = int(candidates[hits[0]])
        if joined >= 0:
            rep_of[q] = joined
        else:
            rep_of[q] = q
            is_rep[q] = True
            rank[q] = n_reps
            n_reps += 1
    return rep_of.tolist()


def _best_bands(
    hit_seq: np.ndarray,
    hit_diag: np.ndarray,
    hopeful: np.ndarray,
    *,
    m: int,
    max_len: int,
    width: int,
    required: int,
    max_cells: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Representatives whose best diagonal band holds >= ``required`` word hits, and that band's centre."""
    n_diag = m + max_len + width  # diagonal d = j - i lies in (-m, max_len); padded for the window
    local = np.full(int(hit_seq.max()) + 1, -1, dtype=np.int64)
    out_c: list[np.ndarray] = []
    out_d: list[np.ndarray] = []
    chunk = max(1, max_cells // n_diag)
    for s in range(0, hopeful.size, chunk):
        reps = hopeful[s : s + chunk]
        local[:] = -1
        local[reps[reps < local.size]] = np.arange(reps.size)
        sel = local[hit_seq]
        keep = sel >= 0
        hist = np.bincount(sel[keep] * n_diag + hit_diag[keep] + m, minlength=reps.size * n_diag).reshape(
            reps.size, n_diag
        )
        csum = np.concatenate([np.zeros((reps.size, 1), dtype=np.int64), np.cumsum(hist, axis=1)], axis=1)
        band_hits = csum[:, width:] - csum[:, :-width]  # window [x, x + width)
        x = band_hits.argmax(axis=1)
        good = band_hits[np.arange(reps.size), x] >= required
        out_c.append(reps[good])
        out_d.append(x[good] + _BAND - m)
    return np.concatenate(out_c), np.concatenate(out_d)


def _as_fraction(value: object, what: str, *, low_open: bool) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        v = float("nan")
    if not (0 < v <= 1 if low_open else 0 <= v <= 1):
        raise ConfigError(f"{what} must be in {'(0' if low_open else '[0'}, 1], got {value!r}")
    return v


def _cluster(
    sequences: Mapping[str, str], *, identity: float, coverage: float, backend: str, threads: int
) -> tuple[dict[str, str], str]:
    identity = _as_fraction(identity, "identity", low_open=True)
    coverage = _as_fraction(coverage, "coverage", low_open=False)
    if threads < 0:
        raise ConfigError(f"threads must be >= 0, got {threads}")
    chosen = _resolve_backend(backend, identity)
    # Sorted ids make every backend independent of the mapping's order (ties in length are broken
    # by input order in CD-HIT and in the Python backend).
    ids = sorted(sequences)
    seqs = [validate_sequence(sequences[i], name=i) for i in ids]
    if not ids:
        return {}, chosen
    if chosen == "cd-hit":
        rep = _cluster_cdhit(seqs, identity=identity, coverage=coverage, threads=threads)
    elif chosen == "mmseqs":
        rep = _cluster_mmseqs(seqs, identity=identity, coverage=coverage, threads=threads)
    else:
        rep = _cluster_python(seqs, identity=identity, coverage=coverage)
    missing = [ids[i] for i, r in enumerate(rep) if r < 0]
    if missing:
        logger.warning(
            "%s left %d sequence(s) unclustered (too short for its word size?), e.g. %r; "
            "each is kept as its own cluster",
            chosen,
            len(missing),
            missing[0],
        )
    out = {ids[i]: ids[r] if r >= 0 else ids[i] for i, r in enumerate(rep)}
    logger.info(
        "clustered %d sequences into %d clusters (%s, identity >= %g, coverage >= %g)",
        len(out),
        len(set(out.values())),
        chosen,
        identity,
        coverage,
    )
    return out, chosen


def cluster_sequences(
    sequences: Mapping[str, str],
    *,
    identity: float,
    coverage: float = 0.8,
    backend: str = "auto",
    threads: int = 1,
) -> dict[str, str]:
    """Cluster protein sequences at an identity threshold (CELL-E S.3.2).

    Two sequences are similar when ``identical aligned residues / length of the shorter sequence >=
    identity`` (CD-HIT's default global identity, ``-G 1``) and the alignment covers at least
    ``coverage`` of the shorter sequence (the paper's 80 %). Clustering is greedy and incremental, as
    in CD-HIT: sequences are visited longest first and join the first representative they are
    similar to, else found a new cluster.

    Parameters
    ----------
    sequences
        ``{id: sequence}``; sequences are validated.
    identity
        Identity threshold in (0, 1].
    coverage
        Minimal alignment coverage of the shorter sequence.
    backend
        ``"cd-hit"`` (binary ``cd-hit``; identity >= 0.4 only), ``"mmseqs"`` (``mmseqs easy-cluster``
        with ``--cluster-mode 2 --cov-mode 1 --seq-id-mode 1``), ``"python"`` (NumPy fallback: k-mer
        filter plus banded Smith-Waterman with BLOSUM62, gap 11/1; about 1 s for 500 sequences of 400
        residues at identity >= 0.4, but the filter stops helping below 0.4 (about 15 s at 0.3) and
        the band around the best word diagonal misses remote homologs with large indels -- use
        MMseqs2 there), or ``"auto"``: cd-hit if on PATH and identity >= 0.4, else mmseqs if on PATH, else
        python.
    threads
        Threads for cd-hit / mmseqs (cd-hit: 0 = all cores); the Python backend is single-threaded.

    Returns
    -------
    dict
        ``{id: id of its cluster representative}`` in sorted id order; a representative maps to itself.

    Raises
    ------
    ConfigError
        For invalid parameters, an unknown backend, or cd-hit below 0.4 identity.
    ProtlocError
        If a requested tool is missing or fails (the message holds the end of its output).
    InputError
        For an invalid sequence.
    """
    clusters, _ = _cluster(sequences, identity=identity, coverage=coverage, backend=backend, threads=threads)
    return clusters


# --------------------------------------------------------------------------------------------------
# homology-aware split


@dataclass(frozen=True)
class HomologySplit:
    """Result of :func:`homology_split`.

    Attributes
    ----------
    assignment
        ``{id: split}``.
    clusters
        ``{id: representative id}`` as returned by :func:`cluster_sequences`.
    backend
        The clustering backend that ran (``"cd-hit"``, ``"mmseqs"`` or ``"python"``).
    identity, coverage
        The clustering thresholds.
    """

    assignment: dict[str, str]
    clusters: dict[str, str]
    backend: str
    identity: float
    coverage: float
    counts: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        counts = {s: 0 for s in SPLIT_NAMES if s in set(self.assignment.values())}
        for s in self.assignment.values():
            counts[s] += 1
        object.__setattr__(self, "counts", counts)

    @property
    def n_clusters(self) -> int:
        """Number of clusters."""
        return len(set(self.clusters.values()))


def homology_split(
    sequences: Mapping[str, str],
    *,
    identity: float,
    fractions: Mapping[str, float] = CELLE_FRACTIONS,
    coverage: float = 0.8,
    seed: int = 0,
    backend: str = "auto",
    threads: int = 1,
) -> HomologySplit:
    """Split proteins so that no sequence cluster straddles two splits (CELL-E paper, S.3.2).

    Sequences are clustered with :func:`cluster_sequences`; the clusters (sorted by representative,
    then shuffled with ``seed``) are dealt one by one to the split furthest below its target item
    count (largest-remainder targets from ``fractions``). With at least as many clusters as splits,
    no split is left empty. Achieved fractions deviate from the targets by at most about one cluster.

    Parameters
    ----------
    sequences
        ``{protein id: sequence}``.
    identity
        Clustering identity threshold (the paper varies it from 0.15 to 0.95).
    fractions
        Target fractions, default CELL-E's 80 / 20.
    coverage
        Minimal alignment coverage of the shorter sequence (paper: 0.8).
    seed
        Seed of the cluster shuffle.
    backend, threads
        See :func:`cluster_sequences`.

    Returns
    -------
    HomologySplit
        The assignment, the clusters and the backend that ran.
    """
    fr = _check_fractions(fractions)
    clusters, used = _cluster(sequences, identity=identity, coverage=coverage, backend=backend, threads=threads)
    groups: dict[str, list[str]] = {}
    for pid, rep in clusters.items():
        groups.setdefault(rep, []).append(pid)
    reps = sorted(groups)
    order = [reps[i] for i in np.random.default_rng(seed).permutation(len(reps))]
    targets = _target_counts(len(clusters), fr)
    filled = {s: 0 for s in fr}
    dealt: dict[str, list[str]] = {s: [] for s in fr}
    for rep in order:
        # Furthest below target; ties go to the earlier split name.
        s = max(fr, key=lambda name: (targets[name] - filled[name], -SPLIT_NAMES.index(name)))
        dealt[s].append(rep)
        filled[s] += len(groups[rep])
    if len(reps) >= len(fr):
        for s in fr:
            if not dealt[s]:
                donor = max(fr, key=lambda t: (len(dealt[t]), -SPLIT_NAMES.index(t)))
                smallest = min(dealt[donor], key=lambda r: len(groups[r]))
                dealt[donor].remove(smallest)
                dealt[s].append(smallest)
                filled[donor] -= len(groups[smallest])
                filled[s] += len(groups[smallest])
    assignment: dict[str, str] = {}
    for s, rs in dealt.items():
        for rep in rs:
            for pid in groups[rep]:
                assignment[pid] = s
    assignment = {pid: assignment[pid] for pid in sorted(assignment)}
    logger.info("homology split (%s, identity %g): %s, targets %s", used, identity, filled, targets)
    return HomologySplit(assignment=assignment, clusters=clusters, backend=used, identity=identity, coverage=coverage)


# --------------------------------------------------------------------------------------------------


def assign_splits(
    df: pd.DataFrame,
    mapping: Mapping,
    *,
    key: str = "protein_id",
    column: str = "split",
) -> pd.DataFrame:
    """Add a split column to a table from a ``{key value: split}`` mapping.

    Parameters
    ----------
    df
        Table with a ``key`` column (e.g. a crop manifest).
    mapping
        ``{value of key: split name}``, e.g. from :func:`split_by_protein`.
    key
        Column looked up in ``mapping``.
    column
        Name of the new column (replaced if present).

    Returns
    -------
    pandas.DataFrame
        A copy of ``df`` with ``column`` added.

    Raises
    ------
    InputError
        If ``key`` is not a column, or a key value has no split (naming the first such value and its
        0-based row).
    """
    if key not in df.columns:
        raise InputError(f"no column {key!r} to assign splits by (columns: {', '.join(map(str, df.columns))})")
    lookup = dict(mapping)
    values = df[key].tolist()
    splits = []
    for row, v in enumerate(values):
        try:
            splits.append(lookup[v])
        except (KeyError, TypeError):
            n_missing = sum(1 for x in values if not _hashable_in(x, lookup))
            raise InputError(f"{key} {v!r} has no split assignment ({n_missing} row(s) without one)", row=row) from None
    out = df.copy()
    if column in out.columns:
        logger.info("replacing existing column %r", column)
    out[column] = pd.Series(splits, index=out.index, dtype=object)
    return out


def _hashable_in(x: object, lookup: Mapping) -> bool:
    try:
        return x in lookup
    except TypeError:
        return False
