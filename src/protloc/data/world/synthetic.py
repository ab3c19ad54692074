"""Localization as a function of planted sequence signals.

The fully synthetic mode of the reference cell world: a protein's compartment weights are a
deterministic function of its sequence, so the truth is known for *any* sequence -- held-out, mutated
or engineered ones included. The rules are simplified textbook targeting signals.

Signals (:data:`SIGNALS`; positions are 0-based, end exclusive):

================== ============================================================== =================
signal             rule                                                           directs to
================== ============================================================== =================
nls_monopartite    ``K[KR].[KR]`` (classical NLS core, e.g. SV40 ``PKKKRKV``);    nucleoplasm
                   strength = K/R count in the 6 residues from one before the
                   core, divided by 5 (capped at 1): SV40 1.0, N-Myc ``PPQKKIKS``
                   0.6
nls_bipartite      ``[KR][KR].{10,12}[KR][KR].[KR]`` (nucleoplasmin                nucleoplasm
                   ``KRPAATKKAGQAKKKK``); strength 1
nols               8 residues with >= 6 K/R, >= 3 of them R (nucleolar signals     nucleolus
                   are arginine-rich; SV40 ``KPKKKRKV`` is not one); strength
                   0.75, or 1 with >= 7 K/R
mts                first 25 residues: no D/E, >= 3 K/R, >= 10 of R/L/A/S and >= 6 mitochondria
                   hydrophobic (amphipathic presequence); strength 1 with >= 4
                   K/R, else 0.7
signal_peptide     a hydrophobic run (AILMFVWC) of 7-15 residues starting at       vesicles (er with
                   position 2-16 and ending by residue 30, after an n-region       retention,
                   (from position 1) holding a K or R; strength (run - 5) / 4,     plasma membrane
                   capped at 1                                                     with a TM)
er_retention       C-terminal ``[KH]DEL``; acts only with a signal peptide or TM   er
transmembrane      20 residues with >= 18 hydrophobic (AILMFVWC)                   er
caax               C-terminal ``C[AILV][AILV].`` (prenylation)                     plasma_membrane
myristoyl_polybasic ``^MG...[STACGN]`` (N-myristoylation) with >= 5 K/R in         plasma_membrane
                   residues 6-29
nes                ``[LIVFM].{2,3}[LIVFM].{2,3}[LIVFM].[LIVFM]`` with >= 3 of the  cytosol (export)
                   four hydrophobic positions L; strength 0.75, or 1 with four L
================== ============================================================== =================

Weights (:func:`sequence_weights`) follow the order in which a cell sorts a new protein:

1. **Secretory pathway.** ``f_sec = max(SP strength, 1 if any TM)``. That share goes to the ER when
   a ``[KH]DEL`` retention signal is present or the protein has a TM but no SP; to the plasma membrane
   (0.8) and Golgi (0.2) with SP + TM (type I membrane protein); otherwise to vesicles (0.8) and Golgi
   (0.2, in transit) -- secreted.
2. **Mitochondria.** Of the rest, the MTS strength goes to mitochondria.
3. **Lipid anchors.** Of the rest, the CAAX / myristoyl + polybasic strength goes to the plasma
   membrane.
4. **Nucleus vs cytoplasm** for the soluble rest. Passive diffusion through nuclear pores gives a
   nuclear share ``p = 0.45 / (1 + exp((M - 60 kDa) / 8 kDa))`` (GFP, 27 kDa: 0.44; 100 kDa: ~0).
   Import ``I`` = sum over NLS groups (overlapping NLS / NoLS hits form one group of the strongest
   strength; a NoLS counts 0.8 of its strength), export ``E`` = sum of NES strengths: several signals
   add up, so a protein with many NLSs stays nuclear despite an NES. With ``d = I - E``, the nuclear
   share is ``n = p + (1 - p) * 0.95 * min(d, 1)`` when ``d >= 0``, else ``p * (1 - 0.9 min(-d, 1))``.
   A NoLS sends ``0.85 * strength`` of the nuclear share to the nucleolus; the remainder of the nuclear
   share is nucleoplasm, the non-nuclear share cytosol.

Nothing reaches the nuclear envelope, chromatin, cytoskeleton or centrosome in this mode.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd

from protloc.data.sequences import validate_sequence
from protloc.data.world.compartments import COMPARTMENTS, WEIGHT_COLUMNS
from protloc.errors import ConfigError

__all__ = [
    "SIGNALS",
    "Hit",
    "Signal",
    "explain",
    "make_synthetic_proteins",
    "passive_nuclear_share",
    "plant_signal",
    "protein_mass_kda",
    "sequence_weights",
]

logger = logging.getLogger(__name__)

_C = {name: i for i, name in enumerate(COMPARTMENTS)}


@dataclass(frozen=True)
class Signal:
    """A targeting signal rule.

    Attributes
    ----------
    name
        Identifier used in :func:`explain` hits.
    compartment
        Where the signal directs the protein on its own.
    position
        ``"N"`` (N-terminal), ``"C"`` (C-terminal) or ``"internal"``.
    rule
        The rule in words.
    example
        A sequence fragment that satisfies it.
    """

    name: str
    compartment: str
    position: str
    rule: str
    example: str


SIGNALS: dict[str, Signal] = {
    s.name: s
    for s in (
        Signal("nls_monopartite", "nucleoplasm", "internal", "K[KR].[KR] with >= 3 K/R nearby", "PKKKRKV"),
        Signal("nls_bipartite", "nucleoplasm", "internal", "[KR][KR].{10,12}[KR][KR].[KR]", "KRPAATKKAGQAKKKK"),
        Signal("nols", "nucleolus", "internal", ">= 6 of 8 residues K/R, >= 3 R", "RRKRRRGR"),
        Signal("mts", "mitochondria", "N", "amphipathic R/L/A/S-rich, no D/E, first 25", "MLSRLLRASSALRRAGLRVSPLTRA"),
        Signal("signal_peptide", "vesicles", "N", "n-region K/R + 7-15 hydrophobic in first 30", "MKRLLLLALLAVLAGSAQA"),
        Signal("er_retention", "er", "C", "C-terminal [KH]DEL (with a signal peptide or TM)", "KDEL"),
        Signal("transmembrane", "er", "internal", ">= 18 hydrophobic of 20", "LLVAILFGLAVLMIAVLLIA"),
        Signal("caax", "plasma_membrane", "C", "C-terminal C[AILV][AILV].", "CVLS"),
        Signal("myristoyl_polybasic", "plasma_membrane", "N", "^MG...[STACGN] + >= 5 K/R in 6-29", "MGSSKSKPKKKRKKK"),
        Signal("nes", "cytosol", "internal", "[LIVFM].{2,3}[LIVFM].{2,3}[LIVFM].[LIVFM], >= 3 L", "LQKLAELDL"),
    )
}


class Hit(NamedTuple):
    """One signal found in a sequence: ``(signal, start, end, compartment)``, 0-based, end exclusive."""

    signal: str
    start: int
    end: int
    compartment: str


# --------------------------------------------------------------------------------------------------
# physico-chemistry
# --------------------------------------------------------------------------------------------------

# Average residue masses (Da, residue in a chain, i.e. minus water).
_RESIDUE_MASS = {
    "A": 71.08,
    "R": 156.19,
    "N": 114.10,
    "D": 115.09,
    "C": 103.14,
    "E": 129.12,
    "Q": 128.13,
    "G": 57.05,
    "H": 137.14,
    "I": 113.16,
    "L": 113.16,
    "K": 128.17,
    "M": 131.19,
    "F": 147.18,
    "P": 97.12,
    "S": 87.08,
    "T": 101.10,
    "W": 186.21,
    "Y": 163.18,
    "V": 99.13,
    "U": 150.04,
    "O": 237.30,
    "B": 114.60,
    "Z": 128.62,
    "X": 110.0,
}
_WATER = 18.02

#: Amino-acid composition of the human proteome (UniProt, percent), used for background sequences.
HUMAN_COMPOSITION: dict[str, float] = {
    "L": 9.96,
    "S": 8.33,
    "E": 7.10,
    "A": 7.02,
    "G": 6.57,
    "P": 6.31,
    "V": 5.96,
    "K": 5.72,
    "R": 5.64,
    "T": 5.36,
    "Q": 4.77,
    "D": 4.73,
    "I": 4.33,
    "F": 3.65,
    "N": 3.59,
    "Y": 2.66,
    "H": 2.63,
    "C": 2.30,
    "M": 2.13,
    "W": 1.22,
}

_HYDROPHOBIC = frozenset("AILMFVWC")
_BASIC = frozenset("KR")


def protein_mass_kda(seq: str) -> float:
    """Average molecular mass of a protein sequence in kDa."""
    return (sum(_RESIDUE_MASS.get(a, 110.0) for a in seq) + _WATER) / 1000.0


def passive_nuclear_share(mass_kda: float) -> float:
    """Nuclear share of a freely diffusing protein: ``0.45 / (1 + exp((M - 60) / 8))``.

    Small proteins pass nuclear pores and spread over nucleus and cytoplasm (about 0.45 of a
    GFP-sized protein's signal ends up in the nucleus); proteins well above ~60 kDa stay out.
    """
    return 0.45 / (1.0 + math.exp((mass_kda - 60.0) / 8.0))


# --------------------------------------------------------------------------------------------------
# signal detection
# --------------------------------------------------------------------------------------------------

_RE_MONO = re.compile(r"(?=K[KR].[KR])")
_RE_BI = re.compile(r"(?=([KR][KR].{10,12}[KR][KR].[KR]))")
_RE_NES = [re.compile(rf"(?=([LIVFM]).{{{a}}}([LIVFM]).{{{b}}}([LIVFM]).([LIVFM]))") for a in (2, 3) for b in (2, 3)]
_RE_RETENTION = re.compile(r"[KH]DEL$")
_RE_CAAX = re.compile(r"C[AILV][AILV].$")
_RE_MYR = re.compile(r"^MG[^P]{3}[STACGN]")


def _merge(hits: list[tuple[int, int, float]]) -> list[tuple[int, int, float]]:
    """Merge overlapping spans of one signal, keeping the strongest strength."""
    out: list[tuple[int, int, float]] = []
    for s, e, v in sorted(hits):
        if out and s < out[-1][1]:
            ps, pe, pv = out[-1]
            out[-1] = (ps, max(pe, e), max(pv, v))
        else:
            out.append((s, e, v))
    return out


def _basic_prefix(seq: str) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([a in _BASIC for a in seq])])


def _scan(seq: str) -> list[tuple[str, int, int, float]]:
    """All signals of ``seq`` as ``(signal, start, end, strength)``, sorted by position."""
    n = len(seq)
    found: list[tuple[str, int, int, float]] = []
    basic = _basic_prefix(seq)

    def n_basic(s: int, e: int) -> int:
        s, e = max(s, 0), min(e, n)
        return int(basic[e] - basic[s])

    # strength: K/R among the core and one residue either side (SV40 PKKKRKV: 5 -> 1.0; N-Myc: 3 -> 0.6)
    mono = [
        (m.start(), m.start() + 4, min(1.0, n_basic(m.start() - 1, m.start() + 5) / 5.0))
        for m in _RE_MONO.finditer(seq)
    ]
    found += [("nls_monopartite", s, e, v) for s, e, v in _merge(mono)]
    bi = [(m.start(), m.start() + len(m.group(1)), 1.0) for m in _RE_BI.finditer(seq)]
    found += [("nls_bipartite", s, e, v) for s, e, v in _merge(bi)]

    if n >= 8:
        windows = basic[8:] - basic[:-8]
        arg = np.concatenate([[0], np.cumsum([a == "R" for a in seq])])
        arg_windows = arg[8:] - arg[:-8]
        hit = np.flatnonzero((windows >= 6) & (arg_windows >= 3))
        nols = [(int(i), int(i) + 8, 1.0 if windows[i] >= 7 else 0.75) for i in hit]
        found += [("nols", s, e, v) for s, e, v in _merge(nols)]

    head = seq[:25]
    if n >= 40 and not (set(head) & {"D", "E"}):
        kr = sum(a in _BASIC for a in head)
        rlas = sum(a in "RLAS" for a in head)
        hyd = sum(a in "AILVFMW" for a in head)
        if kr >= 3 and rlas >= 10 and hyd >= 6:
            found.append(("mts", 0, 25, 1.0 if kr >= 4 else 0.7))

    sp = _signal_peptide(seq)
    if sp is not None:
        found.append(("signal_peptide", 0, sp[0], sp[1]))

    m = _RE_RETENTION.search(seq)
    if m:
        found.append(("er_retention", m.start(), n, 1.0))

    if n >= 20:
        hyd = np.concatenate([[0], np.cumsum([a in _HYDROPHOBIC for a in seq])])
        win = hyd[20:] - hyd[:-20]
        tm = [(int(i), int(i) + 20, 1.0) for i in np.flatnonzero(win >= 18)]
        found += [("transmembrane", s, e, v) for s, e, v in _merge(tm)]

    m = _RE_CAAX.search(seq)
    if m:
        found.append(("caax", m.start(), n, 1.0))

    m = _RE_MYR.match(seq)
    if m and n_basic(6, 30) >= 5:
        found.append(("myristoyl_polybasic", 0, min(n, 30), 1.0))

    nes = []
    for rx in _RE_NES:
        for m in rx.finditer(seq):
            n_leu = sum(seq[m.start(g)] == "L" for g in (1, 2, 3, 4))
            if n_leu >= 3:
                nes.append((m.start(), m.start(4) + 1, 1.0 if n_leu == 4 else 0.75))
    found += [("nes", s, e, v) for s, e, v in _merge(nes)]
    return sorted(found, key=lambda h: (h[1], h[2], h[0]))


def _signal_peptide(seq: str) -> tuple[int, float] | None:
    """End of the h-region and strength of an N-terminal signal peptide, or ``None``."""
    head = seq[:30]
    i = 2
    while i <= 16 and i < len(head):
        if head[i] in _HYDROPHOBIC and head[i - 1] not in _HYDROPHOBIC:
            j = i
            while j < len(head) and head[j] in _HYDROPHOBIC:
                j += 1
            run = j - i
            # a run that reaches residue 30 may go on: only a run ending inside the window counts
            ends_inside = j < len(head) or len(seq) == len(head)
            if 7 <= run <= 15 and ends_inside and any(a in _BASIC for a in seq[1:i]):
                return j, min(1.0, (run - 5) / 4.0)
            i = j
        i += 1
    return None


def _context_compartment(name: str, names: set[str]) -> str:
    """The compartment a signal sends the protein to, given the other signals present."""
    secretory = "signal_peptide" in names or "transmembrane" in names
    if name == "signal_peptide":
        if "er_retention" in names:
            return "er"
        return "plasma_membrane" if "transmembrane" in names else "vesicles"
    if name == "transmembrane" and "signal_peptide" in names and "er_retention" not in names:
        return "plasma_membrane"
    if name == "er_retention" and not secretory:
        return "cytosol"  # a cytosolic KDEL is not read by anything
    return SIGNALS[name].compartment


def explain(seq: str) -> list[Hit]:
    """List the targeting signals in a sequence.

    Parameters
    ----------
    seq
        Amino-acid sequence (validated: whitespace removed, upper-cased).

    Returns
    -------
    list of Hit
        ``(signal, start, end, compartment)`` tuples, 0-based and end-exclusive, sorted by position.
        ``compartment`` is where the signal sends the protein given the others present (a signal
        peptide with ``KDEL`` says ``er``).

    Raises
    ------
    InputError
        If the sequence is empty or holds letters outside the protein alphabet.
    """
    seq = validate_sequence(seq)
    found = _scan(seq)
    names = {f[0] for f in found}
    return [Hit(name, s, e, _context_compartment(name, names)) for name, s, e, _ in found]


def sequence_weights(seq: str) -> np.ndarray:
    """Compartment weights of a sequence under the rules of this module.

    Parameters
    ----------
    seq
        Amino-acid sequence.

    Returns
    -------
    numpy.ndarray
        ``(12,)`` float64 weights in :data:`~protloc.data.world.compartments.COMPARTMENTS` order,
        summing to 1.

    Raises
    ------
    InputError
        If the sequence is empty or holds letters outside the protein alphabet.
    """
    seq = validate_sequence(seq)
    found = _scan(seq)
    strength: dict[str, float] = {}
    for name, _, _, v in found:
        strength[name] = max(strength.get(name, 0.0), v)
    w = np.zeros(len(COMPARTMENTS))

    s_sp = strength.get("signal_peptide", 0.0)
    tm = "transmembrane" in strength
    f_sec = max(s_sp, 1.0 if tm else 0.0)
    if f_sec > 0:
        if "er_retention" in strength or (tm and s_sp == 0):
            w[_C["er"]] += f_sec
        elif tm:
            w[_C["plasma_membrane"]] += 0.8 * f_sec
            w[_C["golgi"]] += 0.2 * f_sec
        else:
            w[_C["vesicles"]] += 0.8 * f_sec
            w[_C["golgi"]] += 0.2 * f_sec
    rest = 1.0 - f_sec

    f_mito = rest * strength.get("mts", 0.0)
    w[_C["mitochondria"]] += f_mito
    rest -= f_mito

    s_lipid = max(strength.get("caax", 0.0), strength.get("myristoyl_polybasic", 0.0))
    f_pm = rest * s_lipid
    w[_C["plasma_membrane"]] += f_pm
    rest -= f_pm

    if rest > 0:
        p = passive_nuclear_share(protein_mass_kda(seq))
        s_nols = strength.get("nols", 0.0)
        imports = [
            (s, e, v * (0.8 if name == "nols" else 1.0))
            for name, s, e, v in found
            if name in ("nls_monopartite", "nls_bipartite", "nols")
        ]
        imp = sum(v for _, _, v in _merge(imports))
        exp_ = sum(v for name, _, _, v in found if name == "nes")
        d = imp - exp_
        if d >= 0:
            nuclear = p + (1.0 - p) * 0.95 * min(d, 1.0)
        else:
            nuclear = p * (1.0 - 0.9 * min(-d, 1.0))
        q = 0.85 * s_nols
        w[_C["nucleoplasm"]] += rest * nuclear * (1.0 - q)
        w[_C["nucleolus"]] += rest * nuclear * q
        w[_C["cytosol"]] += rest * (1.0 - nuclear)
    return w / w.sum()


# --------------------------------------------------------------------------------------------------
# synthetic proteins
# --------------------------------------------------------------------------------------------------

_AA = np.array(list(HUMAN_COMPOSITION))
_AA_P = np.array(list(HUMAN_COMPOSITION.values())) / sum(HUMAN_COMPOSITION.values())

# Signals a planted signal may bring along (a polybasic stretch is also an NLS core, ...): these do
# not count as accidental.
_COMPANIONS: dict[str, set[str]] = {
    "nols": {"nls_monopartite", "nls_bipartite"},
    "myristoyl_polybasic": {"nls_monopartite", "nols"},
    "nls_bipartite": {"nls_monopartite"},
    "nls_monopartite": set(),
    # hydrophobic, leucine-rich N-terminal / membrane signals often read as an NES too; they capture
    # the protein before nuclear export matters, so the NES does not change the weights
    "mts": {"nes"},
    "signal_peptide": {"nes"},
    "transmembrane": {"nes"},
}

#: Plantable signal kits: name -> (signals it carries, its main compartment).
_KITS: dict[str, tuple[tuple[str, ...], str]] = {
    "nls_monopartite": (("nls_monopartite",), "nucleoplasm"),
    "nls_bipartite": (("nls_bipartite",), "nucleoplasm"),
    "nols": (("nols",), "nucleolus"),
    "nes": (("nes",), "cytosol"),
    "mts": (("mts",), "mitochondria"),
    "signal_peptide": (("signal_peptide",), "vesicles"),
    "signal_peptide_kdel": (("signal_peptide", "er_retention"), "er"),
    "transmembrane": (("transmembrane",), "er"),
    "caax": (("caax",), "plasma_membrane"),
    "myristoyl_polybasic": (("myristoyl_polybasic",), "plasma_membrane"),
}


def _draw(rng: np.random.Generator, n: int, alphabet: str | None = None, p: np.ndarray | None = None) -> str:
    if alphabet is None:
        return "".join(rng.choice(_AA, size=n, p=_AA_P))
    letters = np.array(list(alphabet))
    return "".join(rng.choice(letters, size=n, p=p))


def _clean_background(rng: np.random.Generator, length: int) -> str:
    """A background sequence (human composition, starting with M) without any signal."""
    seq = list("M" + _draw(rng, length - 1))
    for _ in range(200):
        found = _scan("".join(seq))
        if not found:
            return "".join(seq)
        # Re-draw only the residues of each accidental signal (never the initial Met): cheaper and
        # less biased than re-drawing the whole sequence.
        for _, s, e, _ in found:
            s = max(s, 1)
            seq[s:e] = list(_draw(rng, e - s))
    # Pathological case (e.g. a tiny length): start over.
    return _clean_background(rng, length)


def _fragment(kind: str, rng: np.random.Generator) -> str:
    """A random instance of one signal."""
    if kind == "nls_monopartite":
        return "P" + "K" + _draw(rng, 3, "KKR") + "K" + _draw(rng, 1, "VLAE")
    if kind == "nls_bipartite":
        spacer = _draw(rng, int(rng.integers(10, 13)), "AGPSTQNE")
        return "KR" + spacer + "KK" + _draw(rng, 1, "AGKRQ") + "K"
    if kind == "nols":
        core = list(_draw(rng, 8, "RRRK"))
        if rng.random() < 0.5:
            core[int(rng.integers(1, 7))] = _draw(rng, 1, "GSQ")
        return "".join(core)
    if kind == "nes":
        sp = lambda k: _draw(rng, k, "AEQKSTDNG")  # noqa: E731 - spacer residues (not hydrophobic, no P)
        return "L" + sp(int(rng.integers(2, 4))) + "L" + sp(int(rng.integers(2, 4))) + "L" + sp(1) + "L"
    if kind == "mts":
        p = np.array([0.22, 0.28, 0.16, 0.16, 0.04, 0.04, 0.04, 0.03, 0.03])
        return "M" + _draw(rng, 24, "RLASGTQVF", p / p.sum())
    if kind in ("signal_peptide", "signal_peptide_kdel"):
        n_region = _draw(rng, int(rng.integers(1, 4)), "KRSTNQ")
        if not set(n_region) & _BASIC:
            n_region = "K" + n_region[1:]
        h = _draw(rng, int(rng.integers(9, 13)), "LLLAAVIFM")
        return "M" + n_region + h + _draw(rng, 1, "GSTQ") + "A" + _draw(rng, 1, "STQG") + "A"
    if kind == "transmembrane":
        core = list(_draw(rng, 20, "LLLIIVVAAFM"))
        core[int(rng.integers(20))] = _draw(rng, 1, "GSTY")  # one helix-tolerated polar/small residue
        return _draw(rng, 1, "KR") + "".join(core) + _draw(rng, 2, "KR")
    if kind == "caax":
        return "C" + _draw(rng, 2, "AILV") + _draw(rng, 1, "SMQAL")
    if kind == "myristoyl_polybasic":
        return "MG" + _draw(rng, 3, "SQNTA") + _draw(rng, 1, "ST") + _draw(rng, 8, "KKKRRS")
    if kind == "er_retention":
        return _draw(rng, 1, "KH") + "DEL"
    raise ConfigError(f"unknown signal kind {kind!r}; known: {', '.join(_KITS)}")


def plant_signal(seq: str, kind: str, *, rng: np.random.Generator, position: int | None = None) -> str:
    """Plant a random instance of a signal kit at its proper place in ``seq``.

    N-terminal signals replace the sequence start, C-terminal ones its end, internal ones the residues
    at ``position`` (random, away from the termini, when ``None``). The length is unchanged.

    Parameters
    ----------
    seq
        Host sequence.
    kind
        A kit: ``nls_monopartite``, ``nls_bipartite``, ``nols``, ``nes``, ``mts``, ``signal_peptide``,
        ``signal_peptide_kdel``, ``transmembrane``, ``caax``, ``myristoyl_polybasic``.
    rng
        Random source.
    position
        Start of an internal signal.

    Returns
    -------
    str
        The new sequence.
    """
    if kind not in _KITS:
        raise ConfigError(f"unknown signal kit {kind!r}; known: {', '.join(_KITS)}")
    s = list(seq)
    if kind == "signal_peptide_kdel":
        frag = _fragment("signal_peptide", rng)
        s[: len(frag)] = frag
        tail = _fragment("er_retention", rng)
        s[len(s) - len(tail) :] = tail
        return "".join(s)
    frag = _fragment(kind, rng)
    where = SIGNALS[_KITS[kind][0][0]].position
    if where == "N":
        s[: len(frag)] = frag
    elif where == "C":
        s[len(s) - len(frag) :] = frag
    else:
        if position is None:
            position = int(rng.integers(40, max(41, len(s) - 40 - len(frag))))
        s[position : position + len(frag)] = frag
    return "".join(s)


def _kit_slot(kind: str) -> set[str]:
    if kind == "signal_peptide_kdel":
        return {"N", "C"}
    return {SIGNALS[_KITS[kind][0][0]].position}


def make_synthetic_proteins(
    n: int,
    *,
    rng: np.random.Generator,
    length_range: tuple[int, int] = (150, 700),
) -> pd.DataFrame:
    """Random proteins with 0-2 planted signals, in the format of ``assets.load_proteins()``.

    Backgrounds follow the human amino-acid composition and are cleaned of accidental signals; then
    0 (15 %), 1 (60 %) or 2 (25 %) signal kits are planted at their proper places (at most one
    N-terminal and one C-terminal kit; internal kits at non-overlapping positions). The first proteins
    cycle through all kits in a random order, so that every compartment the rules can reach appears
    once ``n`` is at least the number of kits (10). A protein is re-drawn (up to 20 times) when
    planting creates a signal that is neither planted nor a known companion (a polybasic stretch is also
    an NLS core).

    Parameters
    ----------
    n
        Number of proteins.
    rng
        Random source.
    length_range
        Inclusive range of sequence lengths.

    Returns
    -------
    pandas.DataFrame
        Columns ``protein_id`` (``SYN0001`` ...), ``uniprot_id``, ``entrez_id`` (empty), ``length``,
        ``label`` (argmax compartment), ``go_cc`` (empty), the 12 ``w_*`` weights, ``sequence``, plus
        ``signals``: the planted kits, ``;``-separated (empty for none).
    """
    if n < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    lo, hi = int(length_range[0]), int(length_range[1])
    if lo < 120 or hi < lo:
        raise ConfigError(f"length_range must satisfy 120 <= low <= high, got {length_range}")
    kits = list(_KITS)
    order = [kits[i] for i in rng.permutation(len(kits))]
    rows = []
    width = max(4, len(str(n)))
    for i in range(n):
        length = int(rng.integers(lo, hi + 1))
        if i < len(order):
            chosen = [order[i]]
            if rng.random() < 0.25:
                chosen += _compatible(chosen, kits, rng, 1)
        else:
            k = int(rng.choice([0, 1, 2], p=[0.15, 0.6, 0.25]))
            chosen = _compatible([], kits, rng, k)
        seq, chosen = _build(length, chosen, rng)
        w = sequence_weights(seq)
        row = {
            "protein_id": f"SYN{i + 1:0{width}d}",
            "uniprot_id": "",
            "entrez_id": "",
            "length": len(seq),
            "label": COMPARTMENTS[int(np.argmax(w))],
            "go_cc": "",
        }
        row.update(dict(zip(WEIGHT_COLUMNS, w.tolist(), strict=True)))
        row["sequence"] = seq
        row["signals"] = ";".join(chosen)
        rows.append(row)
    cols = ["protein_id", "uniprot_id", "entrez_id", "length", "label", "go_cc", *WEIGHT_COLUMNS, "sequence", "signals"]
    return pd.DataFrame(rows, columns=cols)


def _compatible(chosen: list[str], kits: list[str], rng: np.random.Generator, k: int) -> list[str]:
    """Add ``k`` kits that fit next to ``chosen`` (one N-terminal, one C-terminal at most)."""
    out: list[str] = []
    for _ in range(k):
        used = set().union(*(_kit_slot(c) for c in chosen + out)) - {"internal"}
        options = [c for c in kits if c not in chosen + out and not (_kit_slot(c) & used)]
        if not options:
            break
        out.append(options[int(rng.integers(len(options)))])
    return out


def _build(length: int, chosen: list[str], rng: np.random.Generator) -> tuple[str, list[str]]:
    """Plant ``chosen`` kits into a clean background; returns the sequence and the kits planted."""
    # internal kits go to non-overlapping slots 30 residues apart, from residue 40 to length - 70
    options = np.arange(40, max(length - 70, 41), 30)
    internal = [c for c in chosen if _kit_slot(c) == {"internal"}]
    if len(internal) > options.size:
        # a short protein has room for fewer internal kits than were chosen: drop the extra ones
        dropped = set(internal[options.size :])
        chosen = [c for c in chosen if c not in dropped]
        internal = internal[: options.size]
    expected: set[str] = set()
    for c in chosen:
        expected |= set(_KITS[c][0])
    allowed = set(expected)
    for name in list(expected):
        allowed |= _COMPANIONS.get(name, set())
    seq = ""
    for _ in range(20):
        seq = _clean_background(rng, length)
        slots = np.sort(rng.choice(options, size=len(internal), replace=False))
        for c in chosen:
            if c in internal:
                seq = plant_signal(seq, c, rng=rng, position=int(slots[internal.index(c)]))
            else:
                seq = plant_signal(seq, c, rng=rng)
        names = {h[0] for h in _scan(seq)}
        if expected <= names <= allowed:
            return seq, chosen
    logger.debug("could not plant %s cleanly in 20 tries; keeping the last draw", chosen)
    return seq, chosen
