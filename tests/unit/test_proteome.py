"""The Swiss-Prot corpus build (scripts/build_protein_corpus.py) and the shipped human table."""

from __future__ import annotations

import gzip
import shutil
import sqlite3
import struct
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from protloc.data.proteome import (
    CORPUS_COLUMNS,
    HUMAN_COLUMNS,
    PRESENCE_NAMES,
    compartment_targets,
    human_table_path,
    read_corpus,
    read_human_table,
)
from protloc.data.world.compartments import COMPARTMENTS, WEIGHT_COLUMNS
from protloc.errors import InputError

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
bpc = pytest.importorskip("build_protein_corpus")
bwa = pytest.importorskip("build_world_assets")


def _write_blast_db(base: Path, entries: list[tuple[str, str]]) -> None:
    """A minimal BLAST v4 protein database: index, ASN.1-ish headers with a title, NCBIstdaa sequences."""
    code = {ch: i for i, ch in enumerate(bwa.NCBISTDAA)}
    phr, psq = bytearray(), bytearray(b"\x00")
    hdr, seq = [], []
    for acc, s in entries:
        hdr.append(len(phr))
        title = f"{acc}|GO:0005634".encode()
        # a SEQUENCE wrapper, then the title as a VisibleString (tag 0x1a, short or long length)
        ln = bytes([len(title)]) if len(title) < 128 else b"\x81" + bytes([len(title)])
        phr += b"\x30\x80\xa0\x80" + b"\x1a" + ln + title + b"\x00\x00\x00\x00"
        seq.append(len(psq))
        psq += bytes(code[c] for c in s) + b"\x00"
    hdr.append(len(phr))
    seq.append(len(psq))
    pin = struct.pack(">ii", 4, 1)
    for text in (b"test db", b"Jan 1, 2014"):
        pin += struct.pack(">i", len(text)) + text
    pin += struct.pack(">i", len(entries)) + struct.pack("<q", sum(len(s) for _, s in entries))
    pin += struct.pack(">i", max(len(s) for _, s in entries))
    pin += struct.pack(f">{len(hdr)}i", *hdr) + struct.pack(f">{len(seq)}i", *seq)
    Path(f"{base}.pin").write_bytes(pin)
    Path(f"{base}.phr").write_bytes(bytes(phr))
    Path(f"{base}.psq").write_bytes(bytes(psq))


def test_blast_reader_reads_every_entry(tmp_path: Path) -> None:
    entries = [("P12345", "MKVLAAGIVGK"), ("Q9XYZ1", "ACDEFGHIKLMNPQRSTVWY" * 8), ("A0A001", "MXBZUO")]
    _write_blast_db(tmp_path / "db", entries)
    got = bpc.read_blast_db(*(Path(f"{tmp_path / 'db'}.{e}") for e in ("pin", "phr", "psq")))
    assert got == dict(entries)


def test_blast_reader_refuses_a_nucleotide_db(tmp_path: Path) -> None:
    _write_blast_db(tmp_path / "db", [("P1", "MK")])
    pin = Path(f"{tmp_path / 'db'}.pin")
    pin.write_bytes(struct.pack(">ii", 4, 0) + pin.read_bytes()[8:])
    with pytest.raises(SystemExit, match="not a version-4 protein"):
        bpc.read_blast_db(pin, Path(f"{tmp_path / 'db'}.phr"), Path(f"{tmp_path / 'db'}.psq"))


def _tiny_go(path: Path) -> None:
    """A GO.db-shaped sqlite holding the anchors, plastid and a few children."""
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE go_term (_id INTEGER, go_id TEXT, term TEXT, ontology TEXT)")
    con.execute("CREATE TABLE go_cc_offspring (_id INTEGER, _offspring_id INTEGER)")
    terms = {go: name for go, (name, _, _) in bwa.ANCHORS.items()}
    terms |= {
        bwa.EXTRACELLULAR: "extracellular region",
        bpc.PLASTID: "plastid",
        "GO:0009507": "chloroplast",
        "GO:0016607": "nuclear speck",
        "GO:0070062": "extracellular exosome",
    }
    ids = {go: i for i, go in enumerate(sorted(terms))}
    con.executemany("INSERT INTO go_term VALUES (?, ?, ?, 'CC')", [(ids[g], g, n) for g, n in terms.items()])
    edges = [
        ("GO:0005634", "GO:0005654"),  # nucleus > nucleoplasm
        ("GO:0005654", "GO:0016607"),  # nucleoplasm > nuclear speck
        ("GO:0005634", "GO:0016607"),
        ("GO:0005737", "GO:0005739"),  # cytoplasm > mitochondrion
        ("GO:0005737", bpc.PLASTID),  # cytoplasm > plastid
        ("GO:0005737", "GO:0009507"),
        (bpc.PLASTID, "GO:0009507"),
        (bwa.EXTRACELLULAR, "GO:0070062"),
    ]
    con.executemany("INSERT INTO go_cc_offspring VALUES (?, ?)", [(ids[a], ids[b]) for a, b in edges])
    con.commit()
    con.close()


def test_labeller_maps_go_terms_through_the_ancestry(tmp_path: Path) -> None:
    _tiny_go(tmp_path / "GO.sqlite")
    lab = bpc.Labeller(tmp_path / "GO.sqlite")
    w, used = lab.label(["GO:0016607"])  # nuclear speck: below nucleoplasm (and nucleus), most specific wins
    assert used == ["GO:0016607"] and w[COMPARTMENTS.index("nucleoplasm")] == 1.0
    w, _ = lab.label(["GO:0005737", "GO:0005739"])  # generic cytoplasm 0.25 vs mitochondrion 1
    assert w[COMPARTMENTS.index("mitochondria")] == pytest.approx(0.8)
    assert w[COMPARTMENTS.index("cytosol")] == pytest.approx(0.2)
    assert lab.label(["GO:0070062"]) == (None, [])  # extracellular: ignored
    assert lab.label(["GO:0009507"]) == (None, [])  # chloroplast: not cytosol
    assert "GO:0009507" in lab.plastid


def test_partition_keeps_components_whole_and_near_80_10_10() -> None:
    rng = np.random.default_rng(1)
    n = 2000
    names = [f"P{i}" for i in range(n)]
    # random homology edges within blocks of 1-6 proteins, plus one large family
    pairs = []
    i = 0
    while i < n:
        k = int(rng.integers(1, 7))
        pairs += [(names[j], names[j + 1]) for j in range(i, min(i + k, n) - 1)]
        i += k
    pairs += [(names[j], names[j + 1]) for j in range(0, 60)]
    df = pd.DataFrame(pairs, columns=["query", "target"])
    comp = bpc.components(names, df)
    present = (rng.uniform(size=(n, len(COMPARTMENTS))) < 0.15).astype(float)
    part = bpc.assign_partitions(comp, present)
    for c in np.unique(comp):
        assert len(set(part[comp == c])) == 1, "a component straddles splits"
    for a, b in pairs:
        assert part[names.index(a)] == part[names.index(b)], "homologous pair split"
    frac = {s: float((part == s).mean()) for s in ("train", "val", "test")}
    assert abs(frac["train"] - 0.8) < 0.02 and abs(frac["val"] - 0.1) < 0.02 and abs(frac["test"] - 0.1) < 0.02
    for c in range(len(COMPARTMENTS)):  # every compartment reaches val and test
        assert present[part == "val", c].sum() > 0 and present[part == "test", c].sum() > 0
    assert part[0] == "train"  # the large family (> 1% of proteins) is training data


@pytest.mark.skipif(shutil.which("mmseqs") is None, reason="mmseqs2 not installed")
def test_mmseqs_pairs_apply_identity_and_coverage(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    aa = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    base = "".join(rng.choice(aa, 300))
    mutated = list(base)
    for j in rng.choice(300, 60, replace=False):  # 80% identity
        mutated[j] = str(rng.choice(aa))
    unrelated = "".join(rng.choice(aa, 300))
    fragment = base[:60] + "".join(rng.choice(aa, 400))  # identical over 60 of 460: too little coverage
    seqs = {"base": base, "mut": "".join(mutated), "unrel": unrelated, "frag": fragment}
    pairs = bpc.mmseqs_pairs(seqs, seqs, tmp_path, threads=1)
    linked = {tuple(sorted(p)) for p in zip(pairs["query"], pairs["target"], strict=True)}
    assert ("base", "mut") in linked
    assert not any("unrel" in p for p in linked)
    assert not any("frag" in p for p in linked)


def _corpus(n: int = 6) -> pd.DataFrame:
    w = np.zeros((n, len(COMPARTMENTS)))
    w[np.arange(n), np.arange(n) % len(COMPARTMENTS)] = 1.0
    return pd.DataFrame(
        {
            "accession": [f"P{i}" for i in range(n)],
            "human": [1] * n,
            "partition": ["train", "val", "test"] * (n // 3),
            "length": [3] * n,
            "label": [COMPARTMENTS[i % len(COMPARTMENTS)] for i in range(n)],
            "go_cc": ["GO:0005654"] * n,
            **{c: w[:, j] for j, c in enumerate(WEIGHT_COLUMNS)},
            "sequence": ["MKV"] * n,
        }
    )


def test_read_corpus_and_targets(tmp_path: Path) -> None:
    path = tmp_path / "c.tsv.gz"
    _corpus().to_csv(path, sep="\t", index=False)
    df = read_corpus(path, validate=True)
    presence, dist = compartment_targets(df)
    assert presence.shape == (6, len(PRESENCE_NAMES)) and dist.shape == (6, len(COMPARTMENTS))
    assert presence[:, -1].tolist() == [1, 1, 0, 1, 0, 0]  # nucleoplasm, nucleolus, chromatin are nuclear
    np.testing.assert_allclose(dist.sum(1), 1.0)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: d.drop(columns=["sequence"]), "missing columns sequence"),
        (lambda d: d.assign(partition="holdout"), "unknown partition"),
        (lambda d: d.assign(w_cytosol=d["w_cytosol"] + 0.5), r"row 2 \(P0\): compartment weights"),
    ],
)
def test_read_corpus_refuses_bad_tables(tmp_path: Path, change, match: str) -> None:
    path = tmp_path / "c.tsv"
    change(_corpus()).to_csv(path, sep="\t", index=False)
    with pytest.raises(InputError, match=match):
        read_corpus(path)


def test_read_corpus_names_an_invalid_residue(tmp_path: Path) -> None:
    path = tmp_path / "c.tsv"
    _corpus().assign(sequence=["MKV", "MK1", "MKV", "MKV", "MKV", "MKV"]).to_csv(path, sep="\t", index=False)
    with pytest.raises(InputError, match=r"row 3 \(P1\)"):
        read_corpus(path, validate=True)


@pytest.mark.skipif(not human_table_path().is_file(), reason="human table not built")
def test_shipped_human_table_invariants() -> None:
    df = read_human_table()
    assert set(CORPUS_COLUMNS + HUMAN_COLUMNS) <= set(df.columns)
    assert len(df) > 10_000 and df["human"].all()
    assert df["gene_symbol"].is_unique and df["accession"].is_unique
    per_cluster = df.groupby("cluster")["partition"].nunique()
    assert (per_cluster == 1).all(), "a homology cluster straddles partitions"
    frac = df["partition"].value_counts(normalize=True)
    assert 0.75 < frac["train"] < 0.85 and 0.07 < frac["val"] < 0.13 and 0.07 < frac["test"] < 0.13
    with gzip.open(human_table_path(), "rt") as fh:
        assert fh.readline().startswith("accession\t")


def _tiny_orgdb(path: Path, genes: list[tuple[str, str, str, list[str]]]) -> None:
    """An org.Hs.eg.db-shaped sqlite: (accession, Entrez id, symbol, GO CC terms with evidence IDA)."""
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE genes (_id INTEGER, gene_id TEXT)")
    con.execute("CREATE TABLE gene_info (_id INTEGER, symbol TEXT)")
    con.execute("CREATE TABLE uniprot (_id INTEGER, uniprot_id TEXT)")
    con.execute("CREATE TABLE go_cc (_id INTEGER, go_id TEXT, evidence TEXT)")
    for i, (acc, entrez, symbol, terms) in enumerate(genes):
        con.execute("INSERT INTO genes VALUES (?, ?)", (i, entrez))
        con.execute("INSERT INTO gene_info VALUES (?, ?)", (i, symbol))
        con.execute("INSERT INTO uniprot VALUES (?, ?)", (i, acc))
        con.executemany("INSERT INTO go_cc VALUES (?, ?, 'IDA')", [(i, t) for t in terms])
        con.execute("INSERT INTO go_cc VALUES (?, 'GO:0005739', 'IEA')", (i,))  # electronic: ignored
    con.commit()
    con.close()


def _mutate(rng: np.random.Generator, seq: str, share: float) -> str:
    aa = list("ACDEFGHIKLMNPQRSTVWY")
    out = list(seq)
    for j in rng.choice(len(seq), int(share * len(seq)), replace=False):
        out[j] = str(rng.choice(aa))
    return "".join(out)


@pytest.mark.skipif(shutil.which("mmseqs") is None, reason="mmseqs2 not installed")
def test_build_partitions_and_drops_heldout_homologs(tmp_path: Path) -> None:
    """The whole build on a tiny database: 40 human proteins in families, and homologs in other species."""
    rng = np.random.default_rng(3)
    aa = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    human, other, annot, genes = [], [], {}, []
    terms = ["GO:0005654", "GO:0005739", "GO:0005730", "GO:0005886"]
    for fam in range(20):
        root = "".join(rng.choice(aa, 150))
        for k in range(2):  # two human paralogs per family (~85% identical)
            acc = f"H{fam:02d}{k}"
            human.append((acc, _mutate(rng, root, 0.15)))
            genes.append((acc, str(1000 + 2 * fam + k), f"GENE{fam}_{k}", [terms[fam % 4]]))
        other.append((f"O{fam:02d}A", _mutate(rng, root, 0.25)))  # an ortholog in another species
        other.append((f"O{fam:02d}B", "".join(rng.choice(aa, 150))))  # an unrelated protein
    other.append(("C00001", "".join(rng.choice(aa, 120))))  # a plastid protein: dropped
    for acc, _ in human:
        annot[acc] = ["GO:0005737"]
    for acc, _ in other:
        annot[acc] = ["GO:0005737"] if acc.endswith("B") else ["GO:0005739"]
    annot["C00001"] = ["GO:0009507"]
    _write_blast_db(tmp_path / "db", human + other)
    (tmp_path / "annot.dat").write_text("".join(f"{a}\t" + "\t".join(t) + "\n" for a, t in annot.items()))
    _tiny_go(tmp_path / "GO.sqlite")
    _tiny_orgdb(tmp_path / "org.sqlite", genes)
    paths = {e: Path(f"{tmp_path / 'db'}.{e}") for e in ("pin", "phr", "psq")}
    paths |= {"annot": tmp_path / "annot.dat", "godb": tmp_path / "GO.sqlite", "orgdb": tmp_path / "org.sqlite"}
    corpus, table, log = bpc.build(paths, tmp_path / "work", threads=1)

    assert len(table) == 40 and table["human"].all() and (table["label_source"] == "org.Hs.eg.db-2022").all()
    assert set(table["partition"]) == {"train", "val", "test"}
    for _, fam in table.groupby(table["gene_symbol"].str.split("_").str[0]):
        assert fam["partition"].nunique() == 1 and fam["cluster"].nunique() == 1  # paralogs stay together
    row = table.set_index("accession").loc["H000"]
    assert row["w_nucleoplasm"] == 1.0 and row["w_mitochondria"] == 0.0  # IEA line ignored
    assert "C00001" not in set(corpus["accession"]) and log["dropped"]["plastid (non-human)"] == 1
    heldout = set(table.loc[table["partition"] != "train", "gene_symbol"].str.split("_").str[0].str[4:].astype(int))
    kept = set(corpus["accession"])
    for fam in range(20):
        assert (f"O{fam:02d}A" in kept) == (fam not in heldout), f"family {fam}: ortholog of a held-out protein"
        assert f"O{fam:02d}B" in kept  # unrelated proteins stay
    assert (corpus.loc[corpus["accession"].str.endswith("B"), "sample_weight"] == 0.25).all()  # cytoplasm only
    assert set(corpus.loc[~corpus["human"].astype(bool), "partition"]) == {"train"}
