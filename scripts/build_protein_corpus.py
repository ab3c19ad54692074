"""Build the Swiss-Prot localization corpus, the human proteome table and its homology partition.

Usage::

    .venv/bin/python scripts/build_protein_corpus.py [--cache DIR] [--corpus-out FILE] [--asset-dir DIR]

Needs ``apt-get update`` run once (for ``apt-get download``) and ``mmseqs`` on the PATH (Debian
``mmseqs2``, ``apt-get install mmseqs2``). Nothing is installed from the data packages: each ``.deb`` is
downloaded into ``--cache`` and only the members below are extracted, each checked against its recorded
SHA-256, so a rebuild reproduces the committed table byte for byte or stops.

Inputs
------
``metastudent-data=2.0.1-8`` (Debian bookworm; UniProtKB/Swiss-Prot 2014-01, CC BY 4.0):
``dataset_201401/CCO/goasp.fasta.{pin,phr,psq}`` (a BLAST v4 protein database, one entry per protein,
title ``ACCESSION|GO:...``) and ``CCO/goasp_annot.dat`` (accession, then its GO cellular-component
terms, one per annotation line: 392,822 proteins of all species). ``r-bioc-org.hs.eg.db=3.16.0-1``
(the ``uniprot``, ``genes``, ``gene_info`` and ``go_cc`` tables) and ``r-bioc-go.db=3.16.0-1`` (the
cellular-component closure), as for the world assets (``scripts/build_world_assets.py``).

Labels
------
A protein's GO terms vote for the 12 compartments through the world assets' rule
(:class:`build_world_assets.GoAncestry`: the most specific of the anchor terms a term lies at or
below; generic "cytoplasm" votes 0.25 and generic "nucleus" 0.5, so any organelle term outweighs them;
extracellular terms are ignored). Votes normalised to sum 1 are the compartment weights.

- **Human proteins** (accession in org.Hs.eg.db's ``uniprot`` table, one Entrez gene) are labelled from
  org.Hs.eg.db's ``go_cc`` annotations (2022, every evidence code except IEA and ND: the world's own
  rule, so the world and the encoder agree), falling back to the Swiss-Prot 2014 terms when none maps
  (``label_source``). One row per gene symbol: an Entrez gene with several Swiss-Prot accessions keeps
  its longest sequence.
- **Other species** are labelled from the Swiss-Prot 2014 terms. Two choices about proteins that do not
  live in a human-like cell:

  * *plastid proteins are dropped*: GO places the plastid inside "cytoplasm", so a chloroplast protein
    would be labelled cytosolic, teaching the encoder that a transit peptide (which resembles a
    mitochondrial presequence) means cytosol;
  * *proteins whose only mapped term is the generic "cytoplasm" get sample weight 0.25*: 112,484
    proteins are annotated with GO:0005737 alone, nearly all prokaryotic (Swiss-Prot's rule-based
    annotation of bacterial and archaeal enzymes). They are real cytoplasmic proteins of cells without
    a nucleus and still teach the sequence grammar, but at full weight they would bury the eukaryotic
    compartments under a cytosol prior (the sampler multiplies ``sample_weight`` in; 1.0 otherwise).

Homology partition
------------------
The human proteins are searched all-against-all with ``mmseqs easy-search`` (sensitivity 7.5, e-value
<= 1e-3, up to 1000 hits per query). Two proteins are *homologous* when an alignment has >= 30% identity
(``fident``) and covers >= 50% of the shorter sequence. Partition units are the connected components of
that graph (single linkage, stricter than greedy clustering: no pair across two splits is homologous).
Components of more than 1% of the proteins (and more than 10) go to ``train``; the rest, in a seeded
random order, each go to the split with the largest deficit against 80 / 10 / 10, counted per protein
and per compartment (a compartment's deficit is weighted by the component's proteins in it, so small compartments spread
evenly). The human val and test proteins are then searched against every non-human protein (the same rule,
up to 20,000 hits per query, so an ortholog family present in every species is found whole) and each
non-human protein homologous to any of them is dropped from the corpus.

Outputs
-------
- ``--corpus-out`` (default ``<cache>/corpus.tsv.gz``): every kept protein (human and not), columns of
  :data:`protloc.data.proteome.CORPUS_COLUMNS` + ``sample_weight``; not shipped.
- ``<asset-dir>/human_proteome.tsv.gz``: the human table (shipped), and ``<asset-dir>/PROVENANCE.md``:
  inputs, versions, SHA-256 of inputs and outputs, counts at each step, the command.
Both tables are gzip files with a zero timestamp, rows sorted by accession.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import hashlib
import io
import json
import re
import shutil
import sqlite3
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "scripts"))

import build_world_assets as bwa  # noqa: E402

from protloc.data.proteome import CORPUS_COLUMNS, HUMAN_COLUMNS, PARTITIONS  # noqa: E402
from protloc.data.world.compartments import COMPARTMENTS, WEIGHT_COLUMNS  # noqa: E402

DEFAULT_CACHE = Path.home() / ".cache" / "protloc" / "protein-corpus"
DEFAULT_ASSETS = REPO / "src" / "protloc" / "data" / "proteome_assets"

_CCO = "usr/share/metastudent-data/dataset_201401/CCO/"
#: (key, package, version, member, SHA-256 of the member).
INPUTS: tuple[tuple[str, str, str, str, str], ...] = (
    ("pin", "metastudent-data", "2.0.1-8", _CCO + "goasp.fasta.pin", bwa.SHA256["blast_pin"]),
    ("phr", "metastudent-data", "2.0.1-8", _CCO + "goasp.fasta.phr", bwa.SHA256["blast_phr"]),
    ("psq", "metastudent-data", "2.0.1-8", _CCO + "goasp.fasta.psq", bwa.SHA256["blast_psq"]),
    (
        "annot",
        "metastudent-data",
        "2.0.1-8",
        _CCO + "goasp_annot.dat",
        "ca1ee6c8eaddc4106fbeff69a68bf89dadfbc8e9449ee48987c3d2a3182a2471",
    ),
    ("orgdb", "r-bioc-org.hs.eg.db", "3.16.0-1", bwa._HS, bwa.SHA256["orgdb"]),
    ("godb", "r-bioc-go.db", "3.16.0-1", bwa._GO, bwa.SHA256["godb"]),
)

PLASTID = "GO:0009536"
CYTOPLASM = "GO:0005737"
GENERIC_CYTOPLASM_WEIGHT = 0.25
MIN_IDENTITY = 0.30
MIN_COVERAGE = 0.50
MAX_EVALUE = 1e-3
SENSITIVITY = 7.5
FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
BIG_COMPONENT = 0.01
BIG_COMPONENT_MIN = 10  # a family of a handful of proteins is never 'large', however few proteins there are
SEED = 20140101


# ------------------------------------------------------------------------------------------ inputs
def fetch(cache: Path) -> dict[str, Path]:
    """Download the packages (once), extract the members, check their SHA-256."""
    out: dict[str, Path] = {}
    for key, package, version, member, sha in INPUTS:
        archive = bwa._apt_download(package, version, cache / "downloads")
        dest = cache / "extracted" / f"{package}-{version}" / member
        if not dest.exists():
            print(f"extracting {member} from {archive.name}", flush=True)
            bwa._extract(archive, member, dest)
        digest = bwa._sha256(dest)
        if digest != sha:
            raise SystemExit(f"{dest}: SHA-256 {digest} differs from the recorded {sha}")
        out[key] = dest
    return out


_TITLE = re.compile(rb"\x1a(?:\x81[\x00-\xff]|\x82[\x00-\xff]{2}|[\x00-\x7f])([A-Za-z0-9_.-]+)\|")


def read_blast_db(pin: Path, phr: Path, psq: Path) -> dict[str, str]:
    """Every entry of a BLAST v4 protein database: accession (the title up to ``|``) -> sequence.

    Raises ``SystemExit`` for a database that is not a version-4 protein one or an entry without a
    readable title.
    """
    hdr, seq = bwa.read_blast_index(pin)
    headers, residues = phr.read_bytes(), psq.read_bytes()
    table = bytes(ord(bwa.NCBISTDAA[i]) if i < len(bwa.NCBISTDAA) else ord("?") for i in range(256))
    out: dict[str, str] = {}
    for oid in range(len(hdr) - 1):
        m = _TITLE.search(headers, hdr[oid], hdr[oid + 1])
        if m is None:
            raise SystemExit(f"{phr}: entry {oid} has no 'ACCESSION|...' title")
        raw = residues[seq[oid] : seq[oid + 1]].rstrip(b"\x00")
        out[m.group(1).decode()] = raw.translate(table).decode()
    return out


def read_annotations(path: Path) -> dict[str, list[str]]:
    """``goasp_annot.dat``: accession -> distinct GO terms in file order."""
    out: dict[str, list[str]] = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0]:
            raise SystemExit(f"{path}: line {i}: expected an accession and GO terms")
        out[fields[0]] = list(dict.fromkeys(fields[1:]))
    return out


# ------------------------------------------------------------------------------------------ labels
class Labeller:
    """GO terms -> compartment weights, caching each term's votes."""

    def __init__(self, godb: Path):
        self.anc = bwa.GoAncestry(godb)
        con = sqlite3.connect(f"file:{godb}?mode=ro", uri=True)
        sql = (
            "SELECT t2.go_id FROM go_cc_offspring o JOIN go_term t1 ON o._id = t1._id "
            "JOIN go_term t2 ON o._offspring_id = t2._id WHERE t1.go_id = ?"
        )
        self.plastid = {r[0] for r in con.execute(sql, (PLASTID,))} | {PLASTID}
        self.known = {r[0] for r in con.execute("SELECT go_id FROM go_term WHERE ontology = 'CC'")}
        con.close()
        self._cache: dict[str, dict[str, float]] = {}

    def votes(self, term: str) -> dict[str, float]:
        if term not in self._cache:
            self._cache[term] = {} if term in self.plastid else self.anc.votes(term)
        return self._cache[term]

    def label(self, terms: list[str]) -> tuple[np.ndarray | None, list[str]]:
        """Weights (None when no term maps) and the terms that voted."""
        votes: dict[str, float] = defaultdict(float)
        used = []
        for t in terms:
            tv = self.votes(t)
            if tv:
                used.append(t)
                for c, v in tv.items():
                    votes[c] += v
        return (bwa._weights(votes) if used else None), used


def human_genes(orgdb: Path, accessions: set[str]) -> dict[str, tuple[int, str, str]]:
    """Swiss-Prot accession -> (org.Hs.eg.db ``_id``, Entrez id, symbol) where exactly one gene maps."""
    con = sqlite3.connect(f"file:{orgdb}?mode=ro", uri=True)
    rows = con.execute(
        "SELECT u.uniprot_id, g._id, g.gene_id, i.symbol FROM uniprot u JOIN genes g ON u._id = g._id "
        "JOIN gene_info i ON i._id = g._id"
    ).fetchall()
    con.close()
    by_acc: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    for acc, _id, gene, symbol in rows:
        if acc in accessions:
            by_acc[acc].append((_id, str(gene), symbol))
    return {a: g[0] for a, g in by_acc.items() if len(g) == 1}


def human_go(orgdb: Path) -> dict[int, list[str]]:
    """org.Hs.eg.db gene ``_id`` -> distinct GO CC terms with a kept evidence code, sorted."""
    con = sqlite3.connect(f"file:{orgdb}?mode=ro", uri=True)
    marks = ",".join("?" * len(bwa.EVIDENCE_KEPT))
    out: dict[int, set[str]] = defaultdict(set)
    for _id, go in con.execute(f"SELECT _id, go_id FROM go_cc WHERE evidence IN ({marks})", bwa.EVIDENCE_KEPT):
        out[_id].add(go)
    con.close()
    return {k: sorted(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------- homology
def _write_fasta(path: Path, items: dict[str, str]) -> None:
    with open(path, "w") as fh:
        for k, s in items.items():
            fh.write(f">{k}\n{s}\n")


def mmseqs_pairs(
    query: dict[str, str], target: dict[str, str], work: Path, threads: int, *, max_seqs: int = 1000
) -> pd.DataFrame:
    """Homologous (query, target) pairs: identity >= 30% over >= 50% of the shorter sequence."""
    exe = shutil.which("mmseqs")
    if exe is None:
        raise SystemExit("mmseqs not found: apt-get install mmseqs2")
    work.mkdir(parents=True, exist_ok=True)
    q, t, hits = work / "query.fasta", work / "target.fasta", work / "hits.m8"
    _write_fasta(q, query)
    _write_fasta(t, target)
    cmd = [exe, "easy-search", str(q), str(t), str(hits), str(work / "tmp"), "--format-output",
           "query,target,fident,qlen,tlen,qstart,qend,tstart,tend,evalue", "-e", str(MAX_EVALUE),
           "-s", str(SENSITIVITY), "--max-seqs", str(max_seqs), "--threads", str(threads), "-v", "1"]  # fmt: skip
    # the search is the slow step: reuse its hits when the inputs and settings are the same
    key = hashlib.sha256(q.read_bytes() + t.read_bytes() + " ".join(cmd[6:]).encode()).hexdigest()
    stamp = work / "hits.sha256"
    if not (hits.is_file() and stamp.is_file() and stamp.read_text() == key):
        bwa._run(cmd, work)
        stamp.write_text(key)
        shutil.rmtree(work / "tmp", ignore_errors=True)
    cols = ["query", "target", "fident", "qlen", "tlen", "qstart", "qend", "tstart", "tend", "evalue"]
    df = pd.read_csv(hits, sep="\t", names=cols, dtype={"query": str, "target": str})
    shorter = np.minimum(df["qlen"], df["tlen"])
    span = np.maximum(df["qend"] - df["qstart"] + 1, df["tend"] - df["tstart"] + 1)
    keep = (df["fident"] >= MIN_IDENTITY) & (span >= MIN_COVERAGE * shorter) & (df["query"] != df["target"])
    return df.loc[keep, ["query", "target", "fident"]].reset_index(drop=True)


def components(names: list[str], pairs: pd.DataFrame) -> np.ndarray:
    """Connected component of each name in the homology graph."""
    index = {n: i for i, n in enumerate(names)}
    a = pairs["query"].map(index).to_numpy()
    b = pairs["target"].map(index).to_numpy()
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(len(names), len(names)))
    _, comp = connected_components(graph, directed=False)
    return comp


def assign_partitions(comp: np.ndarray, present: np.ndarray, *, seed: int = SEED) -> np.ndarray:
    """Whole components to train / val / test, about 80 / 10 / 10, balanced by compartment.

    Parameters
    ----------
    comp
        Component id per protein.
    present
        ``[N, C]`` 0/1 compartment presence per protein.

    Returns
    -------
    numpy.ndarray
        Partition name per protein; every component lies in one partition.
    """
    n = len(comp)
    splits = list(FRACTIONS)
    frac = np.array([FRACTIONS[s] for s in splits])
    ids, sizes = np.unique(comp, return_counts=True)
    members = defaultdict(list)
    for i, c in enumerate(comp):
        members[c].append(i)
    count = np.zeros(len(splits))
    per_c = np.zeros((len(splits), present.shape[1]))
    total_c = present.sum(0) + 1e-9
    out = np.empty(n, dtype=object)
    cut = max(BIG_COMPONENT * n, BIG_COMPONENT_MIN)
    big = ids[sizes > cut]
    rng = np.random.default_rng(seed)
    rest = ids[sizes <= cut]
    order = [*big, *rest[rng.permutation(len(rest))]]
    for c in order:
        idx = members[c]
        v = present[idx].sum(0)
        if c in set(big.tolist()):
            k = 0
        else:
            deficit = (frac * n - count) / n  # share of all proteins still owed to each split
            deficit_c = (frac[:, None] * total_c - per_c) / total_c  # per compartment
            score = deficit + (deficit_c * v).sum(1) / max(v.sum(), 1.0)
            k = int(np.argmax(score))
        out[idx] = splits[k]
        count[k] += len(idx)
        per_c[k] += v
    return out


# --------------------------------------------------------------------------------------------- build
def _gzip_tsv(df: pd.DataFrame, path: Path) -> None:
    buf = io.StringIO()
    df.to_csv(buf, sep="\t", index=False, lineterminator="\n", float_format="%.4f")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        gz.write(buf.getvalue().encode())
    tmp.replace(path)


def build(paths: dict[str, Path], work: Path, threads: int) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    log: dict[str, object] = {}
    seqs = read_blast_db(paths["pin"], paths["phr"], paths["psq"])
    annot = read_annotations(paths["annot"])
    log["blast_entries"] = len(seqs)
    log["annotated_proteins"] = len(annot)
    missing = sorted(set(annot) - set(seqs))
    if missing:
        raise SystemExit(f"{len(missing)} annotated accessions have no sequence, e.g. {missing[:3]}")
    lab = Labeller(paths["godb"])
    genes = human_genes(paths["orgdb"], set(annot))
    hs_go = human_go(paths["orgdb"])
    dropped: Counter = Counter()
    rows = []
    for acc in sorted(annot):
        seq = seqs[acc]
        terms = annot[acc]
        if set(seq) - bwa.VALID_RESIDUES:
            dropped["invalid residue"] += 1
            continue
        human = acc in genes
        if not human and any(t in lab.plastid for t in terms):
            dropped["plastid (non-human)"] += 1
            continue
        w, used, source = None, [], "swissprot-2014"
        if human:
            w, used = lab.label(hs_go.get(genes[acc][0], []))
            source = "org.Hs.eg.db-2022"
        if w is None:
            w, used = lab.label(terms)
            source = "swissprot-2014"
        if w is None:
            dropped["no mapped GO CC term" + (" (human)" if human else "")] += 1
            continue
        row = {
            "accession": acc,
            "human": int(human),
            "partition": "train",
            "length": len(seq),
            "label": COMPARTMENTS[int(np.argmax(w))],
            "go_cc": ";".join(used),
            **dict(zip(WEIGHT_COLUMNS, w.tolist(), strict=True)),
            "sequence": seq,
            "sample_weight": GENERIC_CYTOPLASM_WEIGHT if (not human and used == [CYTOPLASM]) else 1.0,
        }
        if human:
            _, entrez, symbol = genes[acc]
            row.update(gene_symbol=symbol, entrez_id=entrez, label_source=source)
        rows.append(row)
    df = pd.DataFrame(rows)
    log["dropped"] = dict(dropped)
    log["human_in_swissprot_2014"] = sum(1 for a in annot if a in genes)
    # one row per gene symbol: the longest sequence, then the first accession
    hum = df[df["human"] == 1].sort_values(["gene_symbol", "length", "accession"], ascending=[True, False, True])
    dup = hum.duplicated("gene_symbol", keep="first")
    log["human_duplicate_symbol_dropped"] = int(dup.sum())
    df = df.drop(index=hum.index[dup]).reset_index(drop=True)
    log["generic_cytoplasm_only_nonhuman"] = int((df["sample_weight"] < 1).sum())

    hmask = df["human"] == 1
    human = dict(zip(df.loc[hmask, "accession"], df.loc[hmask, "sequence"], strict=True))
    names = list(human)
    pairs = mmseqs_pairs(human, human, work / "human_vs_human", threads)
    comp = components(names, pairs)
    present = (df.loc[hmask, list(WEIGHT_COLUMNS)].to_numpy() > 0).astype(float)
    part = assign_partitions(comp, present)
    df.loc[hmask, "partition"] = part
    df.loc[hmask, "cluster"] = comp
    sizes = np.bincount(comp)
    log["human_homologous_pairs"] = int(len(pairs))
    log["human_components"] = int(len(sizes))
    log["human_singletons"] = int((sizes == 1).sum())
    log["largest_components"] = sorted(sizes.tolist(), reverse=True)[:5]
    log["human_partition_counts"] = {p: int((part == p).sum()) for p in PARTITIONS}
    log["human_partition_compartments"] = {
        p: dict(zip(COMPARTMENTS, present[part == p].sum(0).astype(int).tolist(), strict=True)) for p in PARTITIONS
    }

    held = {a: s for a, s, p in zip(names, human.values(), part, strict=True) if p in ("val", "test")}
    other = dict(zip(df.loc[~hmask, "accession"], df.loc[~hmask, "sequence"], strict=True))
    # held-out proteins as queries (3,300 against 300,000 is far faster than the reverse); up to 20,000
    # hits each, so an ortholog family present in every species is still found whole
    hits = mmseqs_pairs(held, other, work / "heldout_vs_other", threads, max_seqs=20000)
    drop = set(hits["target"])
    log["heldout_proteins_with_nonhuman_homologs"] = int(hits["query"].nunique())
    log["nonhuman_homologous_to_val_test_dropped"] = len(drop)
    df = df[~df["accession"].isin(drop)].reset_index(drop=True)
    log["corpus_proteins"] = int(len(df))
    log["corpus_nonhuman"] = int((df["human"] == 0).sum())

    df = df.sort_values("accession").reset_index(drop=True)
    corpus = df[[*CORPUS_COLUMNS, "sample_weight"]]
    human_df = df[df["human"] == 1].copy()
    human_df["cluster"] = human_df["cluster"].astype(int)
    human_df = human_df[[*CORPUS_COLUMNS, *HUMAN_COLUMNS]]
    return corpus, human_df, log


def write_provenance(
    assets: Path, paths: dict[str, Path], outputs: dict[str, Path], log: dict, argv: list[str]
) -> None:
    lines = [
        "# Human proteome table: provenance",
        "",
        f"Built {_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d')} by `scripts/build_protein_corpus.py` "
        "(see its docstring for every rule).",
        "",
        "Command: `python scripts/build_protein_corpus.py` (options used here: "
        f"`{' '.join(argv) or 'none'}`; they choose folders only, not the result).",
        "",
        "## Inputs (Debian bookworm, `apt-get download`, members read with `dpkg-deb --fsys-tarfile`)",
        "",
        "| key | package | member | SHA-256 |",
        "|---|---|---|---|",
    ]
    for key, package, version, member, _ in INPUTS:
        lines.append(f"| {key} | {package}={version} | `{member}` | `{bwa._sha256(paths[key])}` |")
    mm = subprocess.run(["mmseqs", "version"], capture_output=True, text=True).stdout.strip()
    lines += [
        "",
        f"Homology search: MMseqs2 {mm} (Debian `mmseqs2`), `easy-search -s {SENSITIVITY} -e {MAX_EVALUE}`, "
        "human against human with `--max-seqs 1000`, human val + test against the other species with "
        f"`--max-seqs 20000`; homologous = identity >= {MIN_IDENTITY:.0%} over >= {MIN_COVERAGE:.0%} of the "
        "shorter sequence; partition units = connected components of the human graph.",
        "",
        "Licences: UniProtKB/Swiss-Prot data CC BY 4.0; GO annotations and ontology CC BY 4.0 (GO Consortium); "
        "Entrez Gene public domain; packages: metastudent-data GPL-2+, org.Hs.eg.db and GO.db Artistic-2.0.",
        "",
        "## Outputs",
        "",
        "| file | SHA-256 |",
        "|---|---|",
    ]
    for name, p in outputs.items():
        lines.append(f"| {name} | `{bwa._sha256(p)}` |")
    lines += ["", "## Counts", "", "```json", json.dumps(log, indent=1, sort_keys=True), "```", ""]
    (assets / "PROVENANCE.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="download cache (default: %(default)s)")
    ap.add_argument("--corpus-out", type=Path, default=None, help="corpus table (default: CACHE/corpus.tsv.gz)")
    ap.add_argument("--asset-dir", type=Path, default=DEFAULT_ASSETS, help="where the human table goes")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    cache = args.cache.expanduser().resolve()
    paths = fetch(cache)
    corpus, human, log = build(paths, cache / "mmseqs", args.threads)
    corpus_out = args.corpus_out or cache / "corpus.tsv.gz"
    human_out = args.asset_dir / "human_proteome.tsv.gz"
    _gzip_tsv(corpus, corpus_out)
    _gzip_tsv(human, human_out)
    log_path = corpus_out.with_name("corpus_provenance.json")
    log_path.write_text(json.dumps(log, indent=1, sort_keys=True) + "\n")
    write_provenance(
        args.asset_dir, paths, {"human_proteome.tsv.gz": human_out, "corpus.tsv.gz": corpus_out}, log, argv
    )
    print(json.dumps(log, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
