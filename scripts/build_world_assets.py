"""Rebuild the reference-cell-world assets shipped in ``src/protloc/data/world/assets/``.

Usage::

    .venv/bin/python scripts/build_world_assets.py [--out src/protloc/data/world/assets] [--cache DIR]

Every ingredient comes from a package registry (PyPI through ``pip download --no-deps``, Debian
through ``apt-get download`` + ``dpkg-deb``; nothing is installed, R is never needed). Downloads
and extracted members are kept in ``--cache`` (default ``~/.cache/protloc/world-assets``) and
every extracted input is checked against the SHA-256 recorded in :data:`SHA256`, so a rebuild
either reproduces the committed data files byte for byte or stops with an error. Debian needs
``apt-get update`` to have been run once (the script runs ``apt-get download`` only).

How each ingredient is obtained
-------------------------------
``proteins.tsv``
    Sequences: ``pip download --no-deps --no-binary metapredict metapredict==3.1.1`` (3.1.1 is
    published as an sdist only), member
    ``metapredict-3.1.1/metapredict/tests/input_data/ground_truth_500_seqs.fasta``: the first
    500 entries of the UniProt human reference proteome (UP000005640), UniProt FASTA headers.
    Annotation: ``apt-get download r-bioc-org.hs.eg.db=3.16.0-1 r-bioc-go.db=3.16.0-1``
    (Debian bookworm), members ``usr/lib/R/site-library/org.Hs.eg.db/extdata/org.Hs.eg.sqlite``
    and ``usr/lib/R/site-library/GO.db/extdata/GO.sqlite``, read with :mod:`sqlite3`.
    UniProt accession -> Entrez gene (table ``uniprot``; ties broken by the header's ``GN=``;
    accessions missing there fall back to the unique gene whose ``gene_info.symbol`` equals
    ``GN=``) -> direct GO cellular-component annotations (table ``go_cc``) whose evidence code
    is in :data:`EVIDENCE_KEPT` (all codes except IEA and ND) -> compartments via the GO
    ancestry of ``GO.db`` (table ``go_cc_offspring``, the transitive is_a/part_of closure) to the
    anchor terms of :data:`ANCHORS`. Terms at or below "extracellular region" (GO:0005576,
    e.g. "extracellular exosome") are ignored. For each annotated term, the anchors it lies at
    or below are collected, anchors that are an ancestor of another collected anchor are
    dropped (the most specific anchor wins) and the term votes ``vote / n`` for the compartment
    of each of the ``n`` anchors left. Each GO term counts once per protein whatever the number
    of evidence lines. Votes are normalised to sum 1, rounded to 4 decimals and the rounding
    remainder is put on the largest weight; ``label`` is the first argmax in COMPARTMENTS order.
    Proteins with no mapped term, a residue outside ACDEFGHIKLMNPQRSTVWYBZXUO, or a symbol
    already taken by an earlier record are dropped.

``nuclei.npz``
    (a) ``pip download --no-deps --only-binary :all: --platform manylinux_2_28_x86_64
    --python-version 311 --implementation cp mahotas==1.4.19``, member
    ``mahotas/demos/data/nuclear.png`` (a widefield DNA-stain image of cultured-cell nuclei,
    8-bit, the three channels identical). Segmented here: Gaussian (sigma 2) -> Li threshold ->
    fill holes -> remove objects < 300 px -> watershed on the distance transform (markers:
    local maxima at least 12 px apart) -> keep nuclei that do not touch the image border, have
    no saturated pixel, solidity >= 0.93, area 1500-12000 px and no other object within
    :data:`PAD` px. (b) the same for ``stardist==0.9.2``, members
    ``stardist/data/images/img2d.tif`` and ``mask2d.tif`` (a 2018 Data Science Bowl
    fluorescence nucleus image and its hand-made label mask): the shipped labels are used as
    they are, with the same border / solidity / isolation filters and area 150-5000 px. In
    both, condensed (mitotic / apoptotic) nuclei whose mean signal above the image minimum is
    more than :data:`BRIGHT_OUTLIER` times the median nucleus's are dropped. Each
    kept nucleus is cut to its bounding box plus :data:`PAD` px of background; where a box
    corner still reaches a neighbouring object, that object (dilated by 2 px) is replaced by the
    median of the patch's own background (flagged ``neighbour_filled`` in ``source``); the
    intensities are
    mapped linearly per source image (``(raw - min(raw)) * 40000 / (max over kept nuclei -
    min(raw))``, so relative brightness between nuclei is kept) to uint16. Arrays:
    ``image_000`` (uint16), ``mask_000`` (bool), ..., ``source`` (one string per nucleus) and
    ``pixel_size_hint`` (NaN: neither package states a pixel size; the renderer rescales
    nuclei to a target diameter). Written as a zip with fixed member timestamps.

``engineered.fasta``
    GFP (UniProt P42212, avGFP, 238 aa) and human TOP1 (UniProt P11387, 765 aa) from
    ``apt-get download metastudent-data=2.0.1-8`` (Debian bookworm): the BLAST protein
    database ``usr/share/metastudent-data/dataset_201401/CCO/goasp.fasta.{pin,phr,psq}``
    (UniProtKB/Swiss-Prot as of January 2014), read with the small BLAST-db reader below (index
    file -> header/sequence offsets; NCBIstdaa residue codes). The TOP1 sequence is checked
    against the NLS motifs the CELL-E paper quotes (KKHKEKE at 59-65, KKIKTED at 150-156).
    Constructs follow CELL-E Sec. 2.3 / Figs. 4-5: GFP; GFP + nucleoplasmin NLS
    KRPAATKKAGQAKKKK; GFP + the "N-Myc" NLS PAAKRVKLD (the peptide the paper prints); GFP + a
    16-residue random control peptide (the paper does not print its peptide: ours is drawn
    from the 20 standard residues by SHA-256 of a fixed seed string, rejecting draws with more
    than two K/R); GFP fused to TOP1 aa 1-199, 1-146, 1-67 and 148-199 (Mo et al. 2000, the
    paper's Fig. 5), and full-length TOP1. Peptides and fragments are appended to the GFP C
    terminus with no linker.

``PROVENANCE.md``
    Written last: sources, versions, member paths, licences, SHA-256 of every input and output,
    the build date (``--date``, default today in UTC) and this command.
"""

from __future__ import annotations

import argparse
import bisect
import datetime as _dt
import hashlib
import io
import re
import shutil
import sqlite3
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage import filters, measure, morphology, segmentation
from skimage.feature import peak_local_max

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from protloc.data.world.compartments import COMPARTMENTS, WEIGHT_COLUMNS  # noqa: E402

DEFAULT_OUT = REPO / "src" / "protloc" / "data" / "world" / "assets"
DEFAULT_CACHE = Path.home() / ".cache" / "protloc" / "world-assets"
VALID_RESIDUES = frozenset("ACDEFGHIKLMNPQRSTVWYBZXUO")
PAD = 4
UINT16_TOP = 40000
BRIGHT_OUTLIER = 2.0  # drop nuclei whose mean signal exceeds this multiple of the image's median nucleus
ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_DISK = ndi.generate_binary_structure(2, 1)

# --------------------------------------------------------------------------------------------
# Inputs: registry package, version, member path inside it, SHA-256 of the member.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Input:
    key: str
    registry: str  # "pypi-sdist", "pypi-wheel" or "debian"
    package: str
    version: str
    member: str
    licence: str

    @property
    def sha256(self) -> str:
        return SHA256[self.key]


_HS = "usr/lib/R/site-library/org.Hs.eg.db/extdata/org.Hs.eg.sqlite"
_GO = "usr/lib/R/site-library/GO.db/extdata/GO.sqlite"
_MS = "usr/share/metastudent-data/dataset_201401/CCO/goasp.fasta"

#: SHA-256 of every extracted input member: a rebuild stops if a download differs.
SHA256: dict[str, str] = {
    "seqs": "c5ad348c6c174ad20a9367b82a9c60e0675f5602edb3a58f0178135cbc1edf8c",
    "orgdb": "bba36057dd3100a099e8054511b34d831349761971829a72b84859d2efe34605",
    "godb": "b36edf3e7ba7d5869e587651107421c4f5c4444037cb18e26cd2687698e4a0d0",
    "nuclear_png": "c0d3fc389d90a90118b43b585cd5134a560a7fcadb7b46825fc7845321755e27",
    "stardist_img": "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750",
    "stardist_mask": "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f",
    "blast_pin": "3b392d94edfdb77631fdfb36a2ec847e05a4faf0c009c5510ca8c096ace63aca",
    "blast_phr": "78c210bcd47d07e57358c0f0c88e41e5245ec2ca1770199dd8c6d6836feb32fc",
    "blast_psq": "4210e3ee39a0c3b67851822be2baf39bc3df80e8caaf003f06e7d3258ff834be",
}

INPUTS: dict[str, Input] = {
    i.key: i
    for i in (
        Input(
            "seqs",
            "pypi-sdist",
            "metapredict",
            "3.1.1",
            "metapredict-3.1.1/metapredict/tests/input_data/ground_truth_500_seqs.fasta",
            "MIT (metapredict, Holehouse lab); the sequences are UniProtKB entries, CC BY 4.0",
        ),
        Input(
            "orgdb",
            "debian",
            "r-bioc-org.hs.eg.db",
            "3.16.0-1",
            _HS,
            "Artistic-2.0 (Bioconductor org.Hs.eg.db); data from NCBI Entrez Gene (public domain), "
            "GO annotations (GO Consortium, CC BY 4.0) and UniProt (CC BY 4.0)",
        ),
        Input(
            "godb",
            "debian",
            "r-bioc-go.db",
            "3.16.0-1",
            _GO,
            "Artistic-2.0 (Bioconductor GO.db); Gene Ontology go-basic.obo 2022-07-01, CC BY 4.0",
        ),
        Input(
            "nuclear_png",
            "pypi-wheel",
            "mahotas",
            "1.4.19",
            "mahotas/demos/data/nuclear.png",
            "MIT (mahotas, Luis Pedro Coelho); the image's own origin is not documented in the package",
        ),
        Input(
            "stardist_img",
            "pypi-wheel",
            "stardist",
            "0.9.2",
            "stardist/data/images/img2d.tif",
            "BSD-3-Clause (stardist); image from the 2018 Kaggle Data Science Bowl (Caicedo et al., "
            "Nat. Methods 16, 2019; distributed by the Broad Bioimage Benchmark Collection as BBBC038)",
        ),
        Input(
            "stardist_mask",
            "pypi-wheel",
            "stardist",
            "0.9.2",
            "stardist/data/images/mask2d.tif",
            "as img2d.tif",
        ),
        Input(
            "blast_pin",
            "debian",
            "metastudent-data",
            "2.0.1-8",
            _MS + ".pin",
            "GPL-2+ (Debian metastudent-data, Rostlab); sequences from UniProtKB/Swiss-Prot (2014-01), CC BY 4.0",
        ),
        Input("blast_phr", "debian", "metastudent-data", "2.0.1-8", _MS + ".phr", "as goasp.fasta.pin"),
        Input("blast_psq", "debian", "metastudent-data", "2.0.1-8", _MS + ".psq", "as goasp.fasta.pin"),
    )
}

# --------------------------------------------------------------------------------------------
# GO mapping
# --------------------------------------------------------------------------------------------

#: Evidence codes kept (every GO evidence code except IEA, electronic, and ND, "no data").
EVIDENCE_KEPT: tuple[str, ...] = (
    "EXP",
    "IDA",
    "IPI",
    "IMP",
    "IGI",
    "IEP",  # experimental
    "HTP",
    "HDA",
    "HMP",
    "HGI",
    "HEP",  # high-throughput experimental
    "IBA",
    "IBD",
    "IKR",
    "IRD",  # phylogenetic
    "ISS",
    "ISO",
    "ISA",
    "ISM",
    "IGC",
    "RCA",  # computational, reviewed
    "TAS",
    "NAS",
    "IC",  # author / curator statements
)

#: Terms at or below this are ignored (secreted material, exosome proteomics).
EXTRACELLULAR = "GO:0005576"

#: Anchor GO term -> (its name in GO.db, compartment, vote). A term votes through the most
#: specific anchors it lies at or below (``GO.db`` is_a/part_of closure).
ANCHORS: dict[str, tuple[str, str, float]] = {
    "GO:0005634": ("nucleus", "nucleoplasm", 0.5),  # generic: weaker than a specific nuclear term
    "GO:0005654": ("nucleoplasm", "nucleoplasm", 1.0),
    "GO:0005730": ("nucleolus", "nucleolus", 1.0),
    "GO:0005635": ("nuclear envelope", "nuclear_envelope", 1.0),
    "GO:0005694": ("chromosome", "chromatin", 1.0),
    "GO:0000785": ("chromatin", "chromatin", 1.0),
    "GO:0005737": ("cytoplasm", "cytosol", 0.25),  # generic: low weight, beaten by any organelle
    "GO:0005829": ("cytosol", "cytosol", 1.0),
    "GO:0005739": ("mitochondrion", "mitochondria", 1.0),
    "GO:0005783": ("endoplasmic reticulum", "er", 1.0),
    "GO:0005793": ("endoplasmic reticulum-Golgi intermediate compartment", "golgi", 1.0),
    "GO:0005794": ("Golgi apparatus", "golgi", 1.0),
    "GO:0031982": ("vesicle", "vesicles", 1.0),
    "GO:0005768": ("endosome", "vesicles", 1.0),
    "GO:0005764": ("lysosome", "vesicles", 1.0),
    "GO:0005773": ("vacuole", "vesicles", 1.0),
    "GO:0005777": ("peroxisome", "vesicles", 1.0),
    "GO:0005811": ("lipid droplet", "vesicles", 1.0),
    "GO:0005886": ("plasma membrane", "plasma_membrane", 1.0),
    "GO:0009986": ("cell surface", "plasma_membrane", 1.0),
    "GO:0030054": ("cell junction", "plasma_membrane", 1.0),
    "GO:0005856": ("cytoskeleton", "cytoskeleton", 1.0),
    "GO:0005815": ("microtubule organizing center", "centrosome", 1.0),
    "GO:0005813": ("centrosome", "centrosome", 1.0),
    "GO:0000922": ("spindle pole", "centrosome", 1.0),
    "GO:0036064": ("ciliary basal body", "centrosome", 1.0),
}

# --------------------------------------------------------------------------------------------
# Engineered constructs (CELL-E Sec. 2.3, Figs. 4-5)
# --------------------------------------------------------------------------------------------

NLS_NUCLEOPLASMIN = "KRPAATKKAGQAKKKK"
NLS_NMYC = "PAAKRVKLD"
RANDOM_SEED = "protloc-world-random-control-peptide-v1"
RANDOM_LENGTH = 16
TOP1_FRAGMENTS: tuple[tuple[int, int, str], ...] = (
    (1, 199, "entire N-terminal region"),
    (1, 146, "Motifs I and V"),
    (1, 67, "Motif I only"),
    (148, 199, "Motifs II, III, IV and V"),
)
#: (1-based start, motif) pairs quoted in the CELL-E paper (Fig. 6) used to check TOP1.
TOP1_MOTIFS: tuple[tuple[int, str], ...] = ((59, "KKHKEKE"), (150, "KKIKTED"))
NCBISTDAA = "-ABCDEFGHIKLMNPQRSTVWXYZU*OJ"


# --------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(package: str, version: str, kind: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    pattern = f"{package.replace('-', '_')}-{version}*" if kind == "pypi-wheel" else f"{package}-{version}.tar.gz"
    found = sorted(dest.glob(pattern))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), f"{package}=={version}"]
        if kind == "pypi-wheel":
            cmd += ["--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "311"]
            cmd += ["--implementation", "cp"]
        else:
            cmd += ["--no-binary", package]  # the sdist; build requirements may still be wheels
        _run(cmd, dest)
        found = sorted(dest.glob(pattern))
    if not found:
        raise SystemExit(f"pip download produced no file matching {pattern} in {dest}")
    return found[0]


def _apt_download(package: str, version: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    pattern = f"{package}_{version}_*.deb"
    found = sorted(dest.glob(pattern))
    if not found:
        try:
            _run(["apt-get", "download", f"{package}={version}"], dest)
        except (subprocess.CalledProcessError, FileNotFoundError) as exc:
            raise SystemExit(
                f"apt-get download {package}={version} failed ({exc}); run `apt-get update` first"
            ) from exc
        found = sorted(dest.glob(pattern))
    if not found:
        raise SystemExit(f"apt-get download produced no file matching {pattern} in {dest}")
    return found[0]


def _extract(archive: Path, member: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf, open(tmp, "wb") as out:
            out.write(zf.read(member))
    elif archive.name.endswith(".tar.gz"):
        with tarfile.open(archive) as tf:
            fh = tf.extractfile(member)
            if fh is None:
                raise SystemExit(f"{member} is not a file in {archive}")
            with open(tmp, "wb") as out:
                out.write(fh.read())
    elif archive.suffix == ".deb":
        # dpkg-deb streams the data tarball; only the wanted member is written.
        with open(tmp, "wb") as out:
            # stderr is dropped: dpkg-deb complains of a broken pipe once we stop reading.
            deb = subprocess.Popen(
                ["dpkg-deb", "--fsys-tarfile", str(archive)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
            )
            assert deb.stdout is not None
            with tarfile.open(fileobj=deb.stdout, mode="r|") as tf:
                for info in tf:
                    if info.name.lstrip("./") == member:
                        fh = tf.extractfile(info)
                        assert fh is not None
                        shutil.copyfileobj(fh, out, 1 << 20)
                        break
                else:
                    raise SystemExit(f"{member} not found in {archive}")
            deb.stdout.close()
            deb.wait()
    else:
        raise SystemExit(f"unknown archive type {archive}")
    tmp.replace(dest)


def fetch_inputs(cache: Path) -> dict[str, Path]:
    """Download (once) and extract every input; check each against its recorded SHA-256."""
    paths: dict[str, Path] = {}
    for key, inp in INPUTS.items():
        archive_dir = cache / "downloads"
        if inp.registry == "debian":
            archive = _apt_download(inp.package, inp.version, archive_dir)
        else:
            archive = _pip_download(inp.package, inp.version, inp.registry, archive_dir)
        dest = cache / "extracted" / f"{inp.package}-{inp.version}" / inp.member
        if not dest.exists():
            print(f"extracting {inp.member} from {archive.name}", flush=True)
            _extract(archive, inp.member, dest)
        digest = _sha256(dest)
        if digest != inp.sha256:
            raise SystemExit(f"{dest}: SHA-256 {digest} differs from the recorded {inp.sha256}")
        paths[key] = dest
    return paths


# --------------------------------------------------------------------------------------------
# proteins.tsv
# --------------------------------------------------------------------------------------------


def read_fasta(path: Path) -> list[tuple[str, str]]:
    """Return (header, sequence) pairs in file order."""
    records: list[tuple[str, str]] = []
    header: str | None = None
    chunks: list[str] = []
    for line in path.read_text().splitlines():
        if line.startswith(">"):
            if header is not None:
                records.append((header, "".join(chunks)))
            header, chunks = line[1:].strip(), []
        elif line.strip():
            chunks.append(line.strip())
    if header is not None:
        records.append((header, "".join(chunks)))
    return records


class GoAncestry:
    """Anchor lookup over the GO.db cellular-component closure."""

    def __init__(self, godb: Path):
        con = sqlite3.connect(f"file:{godb}?mode=ro", uri=True)
        names = dict(con.execute("SELECT go_id, term FROM go_term WHERE ontology = 'CC'"))
        for go_id, (name, compartment, vote) in ANCHORS.items():
            if names.get(go_id) != name:
                raise SystemExit(f"anchor {go_id}: GO.db names it {names.get(go_id)!r}, expected {name!r}")
            if compartment not in COMPARTMENTS or vote <= 0:
                raise SystemExit(f"anchor {go_id}: bad compartment {compartment!r} or vote {vote}")
        sql = (
            "SELECT t2.go_id FROM go_cc_offspring o JOIN go_term t1 ON o._id = t1._id "
            "JOIN go_term t2 ON o._offspring_id = t2._id WHERE t1.go_id = ?"
        )
        self.offspring = {a: {r[0] for r in con.execute(sql, (a,))} | {a} for a in [*ANCHORS, EXTRACELLULAR]}
        con.close()

    def votes(self, term: str) -> dict[str, float]:
        """Compartment votes of one GO term (empty when it reaches no anchor or is extracellular)."""
        if term in self.offspring[EXTRACELLULAR]:
            return {}
        hits = [a for a in ANCHORS if term in self.offspring[a]]
        specific = [a for a in hits if not any(b != a and b in self.offspring[a] for b in hits)]
        out: dict[str, float] = defaultdict(float)
        for a in specific:
            _, compartment, vote = ANCHORS[a]
            out[compartment] += vote / len(specific)
        return dict(out)


def _weights(votes: dict[str, float]) -> np.ndarray:
    w = np.array([votes.get(c, 0.0) for c in COMPARTMENTS], dtype=float)
    w = np.round(w / w.sum(), 4)
    w[int(np.argmax(w))] += 1.0 - w.sum()
    return np.round(w, 4)


def build_proteins(seqs: Path, orgdb: Path, godb: Path) -> tuple[pd.DataFrame, dict[str, object]]:
    """Map the metapredict sequences to compartment weights; return the table and a build log."""
    anc = GoAncestry(godb)
    con = sqlite3.connect(f"file:{orgdb}?mode=ro", uri=True)
    by_acc = (
        "SELECT g._id, g.gene_id, i.symbol FROM uniprot u JOIN genes g ON u._id = g._id "
        "JOIN gene_info i ON i._id = g._id WHERE u.uniprot_id = ? ORDER BY CAST(g.gene_id AS INTEGER)"
    )
    by_sym = "SELECT g._id, g.gene_id, i.symbol FROM genes g JOIN gene_info i ON i._id = g._id WHERE i.symbol = ?"
    placeholders = ",".join("?" * len(EVIDENCE_KEPT))
    go_sql = f"SELECT DISTINCT go_id FROM go_cc WHERE _id = ? AND evidence IN ({placeholders}) ORDER BY go_id"
    log: dict[str, object] = {"records": 0, "dropped": Counter(), "evidence_lines": Counter()}
    rows = []
    seen: set[str] = set()
    for header, seq in read_fasta(seqs):
        log["records"] += 1  # type: ignore[operator]
        acc = header.split("|")[1]
        m = re.search(r"\bGN=(\S+)", header)
        gn = m.group(1) if m else None
        genes = con.execute(by_acc, (acc,)).fetchall()
        if len(genes) > 1:
            genes = [g for g in genes if g[2] == gn]
        if not genes and gn:
            genes = con.execute(by_sym, (gn,)).fetchall()
        if len(genes) != 1:
            log["dropped"]["no unique Entrez gene"] += 1  # type: ignore[index]
            continue
        _id, entrez, symbol = genes[0]
        if set(seq) - VALID_RESIDUES:
            log["dropped"]["invalid residue"] += 1  # type: ignore[index]
            continue
        for (ev,) in con.execute("SELECT evidence FROM go_cc WHERE _id = ?", (_id,)):
            log["evidence_lines"][ev] += 1  # type: ignore[index]
        votes: dict[str, float] = defaultdict(float)
        used = []
        for (term,) in con.execute(go_sql, (_id, *EVIDENCE_KEPT)):
            tv = anc.votes(term)
            if tv:
                used.append(term)
                for c, v in tv.items():
                    votes[c] += v
        if not used:
            log["dropped"]["no mapped GO CC term"] += 1  # type: ignore[index]
            continue
        if symbol in seen:
            log["dropped"]["duplicate symbol"] += 1  # type: ignore[index]
            continue
        seen.add(symbol)
        w = _weights(votes)
        rows.append(
            {
                "protein_id": symbol,
                "uniprot_id": acc,
                "entrez_id": str(entrez),
                "length": len(seq),
                "label": COMPARTMENTS[int(np.argmax(w))],
                "go_cc": ";".join(used),
                **dict(zip(WEIGHT_COLUMNS, w.tolist(), strict=True)),
                "sequence": seq,
            }
        )
    con.close()
    df = pd.DataFrame(rows).sort_values("protein_id", kind="stable").reset_index(drop=True)
    return df, log


def write_proteins(df: pd.DataFrame, path: Path) -> None:
    df = df.copy()
    for col in WEIGHT_COLUMNS:
        df[col] = df[col].map(lambda x: f"{x:.4f}")
    df.to_csv(path, sep="\t", index=False, lineterminator="\n")


# --------------------------------------------------------------------------------------------
# nuclei.npz
# --------------------------------------------------------------------------------------------


@dataclass
class Nucleus:
    raw: np.ndarray
    mask: np.ndarray
    source: str


def _cut(raw: np.ndarray, labels: np.ndarray, lab: int, bbox: tuple[int, int, int, int]) -> tuple[np.ndarray, ...]:
    r0, c0, r1, c1 = bbox
    r0, c0, r1, c1 = r0 - PAD, c0 - PAD, r1 + PAD, c1 + PAD
    patch_lab = labels[r0:r1, c0:c1]
    return raw[r0:r1, c0:c1], patch_lab == lab, patch_lab


def _select(
    raw: np.ndarray,
    labels: np.ndarray,
    *,
    min_area: int,
    max_area: int,
    min_solidity: float,
    saturated: float | None,
    name: str,
) -> list[Nucleus]:
    h, w = labels.shape
    out = []
    for rp in measure.regionprops(labels):
        r0, c0, r1, c1 = rp.bbox
        if r0 < PAD + 1 or c0 < PAD + 1 or r1 > h - PAD - 1 or c1 > w - PAD - 1:
            continue  # touches (or is too close to) the image border
        if not (min_area <= rp.area <= max_area) or rp.solidity < min_solidity:
            continue
        patch, mask, patch_lab = _cut(raw, labels, rp.label, rp.bbox)
        if saturated is not None and patch[mask].max() >= saturated:
            continue
        others = (patch_lab != 0) & (patch_lab != rp.label)
        if np.any(others & ndi.binary_dilation(mask, structure=_DISK, iterations=PAD)):
            continue  # a neighbour lies within PAD px of this nucleus
        note = ""
        if others.any():
            # Corners of the box reach into a neighbour: replace it (and its 2-px rim) by the
            # median of the patch's own background, so only this nucleus is left in the patch.
            others = ndi.binary_dilation(others, structure=_DISK, iterations=2) & ~mask
            patch = patch.copy()
            patch[others] = np.median(patch[(patch_lab == 0) & ~others]).astype(patch.dtype)
            note = ";neighbour_filled"
        out.append(Nucleus(patch, mask, f"{name}#label={rp.label}{note}"))
    return out


def segment_mahotas(png: Path) -> list[Nucleus]:
    from skimage import io as skio

    img = skio.imread(png)
    raw = img[..., 0] if img.ndim == 3 else img
    smooth = filters.gaussian(raw.astype(float), sigma=2, preserve_range=True)
    fg = smooth > filters.threshold_li(smooth)
    fg = ndi.binary_fill_holes(fg)
    fg = morphology.remove_small_objects(fg, max_size=299)
    dist = ndi.distance_transform_edt(fg)
    blobs = measure.label(fg)
    peaks = peak_local_max(filters.gaussian(dist, sigma=2), min_distance=12, labels=blobs, exclude_border=False)
    markers = np.zeros_like(blobs)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = segmentation.watershed(-dist, markers, mask=fg)
    return _select(
        raw,
        labels,
        min_area=1500,
        max_area=12000,
        min_solidity=0.93,
        saturated=255,
        name="mahotas-1.4.19:mahotas/demos/data/nuclear.png",
    )


def segment_stardist(img_path: Path, mask_path: Path) -> list[Nucleus]:
    import tifffile

    raw = tifffile.imread(img_path)
    labels = tifffile.imread(mask_path).astype(np.int32)
    return _select(
        raw,
        labels,
        min_area=150,
        max_area=5000,
        min_solidity=0.93,
        saturated=None,
        name="stardist-0.9.2:stardist/data/images/img2d.tif",
    )


def _drop_outliers(nuclei: list[Nucleus], floor: float) -> list[Nucleus]:
    """Drop condensed (mitotic / apoptotic) nuclei far brighter than the population."""
    means = np.array([float(n.raw[n.mask].mean()) - floor for n in nuclei])
    return [n for n, m in zip(nuclei, means, strict=True) if m <= BRIGHT_OUTLIER * float(np.median(means))]


def _to_uint16(nuclei: list[Nucleus], floor: float) -> list[np.ndarray]:
    top = max(float(n.raw[n.mask].max()) for n in nuclei)
    scale = UINT16_TOP / (top - floor)
    return [np.clip(np.rint((n.raw.astype(float) - floor) * scale), 0, 65535).astype(np.uint16) for n in nuclei]


def build_nuclei(paths: dict[str, Path]) -> tuple[dict[str, np.ndarray], Counter]:
    import tifffile
    from skimage import io as skio

    arrays: dict[str, np.ndarray] = {}
    sources: list[str] = []
    counts: Counter = Counter()
    groups = [
        (segment_mahotas(paths["nuclear_png"]), float(skio.imread(paths["nuclear_png"]).min()), "mahotas"),
        (
            segment_stardist(paths["stardist_img"], paths["stardist_mask"]),
            float(tifffile.imread(paths["stardist_img"]).min()),
            "stardist",
        ),
    ]
    i = 0
    for nuclei, floor, tag in groups:
        nuclei = _drop_outliers(nuclei, floor)
        for n, img in zip(nuclei, _to_uint16(nuclei, floor), strict=True):
            arrays[f"image_{i:03d}"] = img
            arrays[f"mask_{i:03d}"] = n.mask.astype(bool)
            sources.append(n.source)
            i += 1
        counts[tag] = len(nuclei)
    arrays["source"] = np.array(sources, dtype=str)
    arrays["pixel_size_hint"] = np.array(np.nan)
    return arrays, counts


def write_npz(arrays: dict[str, np.ndarray], path: Path) -> None:
    """``np.savez_compressed`` with fixed member timestamps, so the bytes are reproducible."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


# --------------------------------------------------------------------------------------------
# engineered.fasta
# --------------------------------------------------------------------------------------------


def read_blast_index(pin: Path) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Header and sequence offsets (``nseq + 1`` each) of a BLAST v4 protein index (``.pin``)."""
    data = pin.read_bytes()
    version, dbtype = struct.unpack(">ii", data[:8])
    if version != 4 or dbtype != 1:
        raise SystemExit(f"{pin}: not a version-4 protein BLAST index")
    pos = 8
    for _ in range(2):  # title, date
        (n,) = struct.unpack(">i", data[pos : pos + 4])
        pos += 4 + n
    (nseq,) = struct.unpack(">i", data[pos : pos + 4])
    pos += 4 + 8 + 4  # nseq, total residues (int64), max length
    hdr = struct.unpack(f">{nseq + 1}i", data[pos : pos + 4 * (nseq + 1)])
    pos += 4 * (nseq + 1)
    return hdr, struct.unpack(f">{nseq + 1}i", data[pos : pos + 4 * (nseq + 1)])


class BlastDb:
    """Minimal reader of a BLAST (format 4) protein database: title lookup and sequences."""

    def __init__(self, pin: Path, phr: Path, psq: Path):
        self.hdr, self.seq = read_blast_index(pin)
        self.phr = phr.read_bytes()
        self.psq = psq.read_bytes()

    def by_accession(self, acc: str) -> str:
        """Sequence of the entry whose defline title starts with ``<acc>|``."""
        key = acc.encode() + b"|"
        # A defline title is an ASN.1 VisibleString: tag 0x1a, then a short (1 byte) or long
        # (0x81 n / 0x82 nn) length; keep only matches that start a title.
        hits = [
            m.start()
            for m in re.finditer(re.escape(key), self.phr)
            if self.phr[m.start() - 2] == 0x1A
            or self.phr[m.start() - 3 : m.start() - 1] == b"\x1a\x81"
            or self.phr[m.start() - 4 : m.start() - 2] == b"\x1a\x82"
        ]
        oids = sorted({bisect.bisect_right(self.hdr, h) - 1 for h in hits})
        if len(oids) != 1:
            raise SystemExit(f"{acc}: {len(oids)} entries in the BLAST database, expected 1")
        oid = oids[0]
        raw = self.psq[self.seq[oid] : self.seq[oid + 1]].rstrip(b"\x00")
        return "".join(NCBISTDAA[b] for b in raw)


def _random_peptide() -> str:
    alphabet = "ACDEFGHIKLMNPQRSTVWY"
    counter = 0
    while True:
        out: list[str] = []
        block = 0
        while len(out) < RANDOM_LENGTH:
            digest = hashlib.sha256(f"{RANDOM_SEED}:{counter}:{block}".encode()).digest()
            out += [alphabet[b % 20] for b in digest if b < 240][: RANDOM_LENGTH - len(out)]
            block += 1
        pep = "".join(out)
        if sum(pep.count(x) for x in "KR") <= 2:
            return pep
        counter += 1


def build_engineered(paths: dict[str, Path]) -> list[tuple[str, dict[str, str], str]]:
    db = BlastDb(paths["blast_pin"], paths["blast_phr"], paths["blast_psq"])
    gfp = db.by_accession("P42212")
    top1 = db.by_accession("P11387")
    if len(gfp) != 238 or not gfp.startswith("MSKGEELFTG") or not gfp.endswith("GMDELYK"):
        raise SystemExit(f"P42212 does not look like avGFP: {gfp[:12]}... ({len(gfp)} aa)")
    if len(top1) != 765:
        raise SystemExit(f"P11387 has {len(top1)} aa, expected 765")
    for start, motif in TOP1_MOTIFS:
        if top1[start - 1 : start - 1 + len(motif)] != motif:
            raise SystemExit(f"P11387 lacks {motif} at {start}")
    src_gfp = "UniProt:P42212(avGFP);debian:metastudent-data=2.0.1-8"
    src_top1 = "UniProt:P11387(TOP1_HUMAN);debian:metastudent-data=2.0.1-8"
    rand = _random_peptide()
    recs: list[tuple[str, dict[str, str], str]] = [
        ("GFP", {"construct": "GFP", "source": src_gfp}, gfp),
        (
            "GFP_NLS_nucleoplasmin",
            {"construct": "GFP+NLS", "peptide": NLS_NUCLEOPLASMIN, "source": src_gfp, "ref": "CELL-E_Fig4"},
            gfp + NLS_NUCLEOPLASMIN,
        ),
        (
            "GFP_NLS_NMyc",
            {"construct": "GFP+NLS", "peptide": NLS_NMYC, "source": src_gfp, "ref": "CELL-E_Fig4"},
            gfp + NLS_NMYC,
        ),
        (
            "GFP_random_peptide",
            {"construct": "GFP+random", "peptide": rand, "source": src_gfp, "seed": RANDOM_SEED},
            gfp + rand,
        ),
        ("TOP1", {"construct": "TOP1", "region": "1-765", "source": src_top1}, top1),
    ]
    for start, end, _note in TOP1_FRAGMENTS:
        recs.append(
            (
                f"GFP_TOP1_{start}-{end}",
                {
                    "construct": "GFP+TOP1_fragment",
                    "region": f"{start}-{end}",
                    "source": f"{src_gfp};{src_top1}",
                    "ref": "CELL-E_Fig5;Mo2000",
                },
                gfp + top1[start - 1 : end],
            )
        )
    return recs


def write_fasta(recs: list[tuple[str, dict[str, str], str]], path: Path) -> None:
    lines = []
    for rid, fields, seq in recs:
        lines.append(">" + " ".join([rid, *(f"{k}={v}" for k, v in fields.items())]))
        lines += [seq[i : i + 60] for i in range(0, len(seq), 60)]
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------
# PROVENANCE.md
# --------------------------------------------------------------------------------------------


def write_provenance(out: Path, paths: dict[str, Path], date: str, info: dict[str, object]) -> None:
    def src(key: str) -> str:
        inp = INPUTS[key]
        if inp.registry == "debian":
            how = f"`apt-get download {inp.package}={inp.version}` (Debian bookworm; `dpkg-deb --fsys-tarfile`)"
        elif inp.registry == "pypi-sdist":
            how = f"`pip download --no-deps --no-binary {inp.package} {inp.package}=={inp.version}` (sdist)"
        else:
            how = (
                f"`pip download --no-deps --only-binary :all: --platform manylinux_2_28_x86_64 --python-version 311 "
                f"--implementation cp {inp.package}=={inp.version}` (wheel)"
            )
        return f"- {how}, member `{inp.member}` (sha256 `{_sha256(paths[key])}`). Licence: {inp.licence}."

    def out_hash(name: str) -> str:
        return f"`{name}` sha256 `{_sha256(out / name)}` ({(out / name).stat().st_size} bytes)"

    anchors = "\n".join(f"  - {g} {n} -> {c} (vote {v:g})" for g, (n, c, v) in ANCHORS.items())
    labels = ", ".join(f"{k} {v}" for k, v in info["label_counts"].items())  # type: ignore[union-attr]
    text = f"""# Reference cell world assets: provenance

Built {date} with `.venv/bin/python scripts/build_world_assets.py --out src/protloc/data/world/assets`
(rebuild: the same command; add `--cache DIR` to choose the download cache). Inputs come only from
package registries and are checked against the SHA-256 values below; the data files are then
byte-reproducible. See the script's docstring for every step.

## proteins.tsv

{out_hash("proteins.tsv")}

Real human protein sequences with GO cellular-component localisations mapped to the 12 world
compartments.

{src("seqs")}
{src("orgdb")}
{src("godb")}

- Mapping: UniProt accession -> Entrez gene (org.Hs.eg.db `uniprot`; ties broken by the FASTA
  `GN=`; missing accessions fall back to the unique `gene_info.symbol` equal to `GN=`) -> direct
  GO CC annotations (`go_cc`) -> the most specific anchor(s) below via GO.db `go_cc_offspring`.
  Terms at or below extracellular region (GO:0005576) are ignored. Each term counts once per
  protein, voting `vote / n` to each of its `n` most specific anchors; weights are normalised,
  rounded to 4 decimals (remainder on the largest), `label` = first argmax.
- Evidence codes kept: {", ".join(EVIDENCE_KEPT)} (IEA and ND excluded).
- Anchors:
{anchors}
- {info["records"]} input records -> {info["n_proteins"]} proteins. Dropped: {dict(info["dropped"])}.
- Proteins per label: {labels}.

## nuclei.npz

{out_hash("nuclei.npz")}

Real nucleus patches: `image_NNN` (uint16, the real intensities mapped linearly per source image
so the brightest kept nucleus pixel is {UINT16_TOP}), `mask_NNN` (bool), `source` (per-nucleus
origin) and `pixel_size_hint` (NaN: the pixel size of neither image is documented, so the
renderer rescales nuclei to a target diameter). {info["nuclei_counts"]}

{src("nuclear_png")}
  Segmented by the script (Gaussian, Li threshold, hole filling, small-object removal,
  distance-transform watershed); kept nuclei are isolated, unsaturated, convex (solidity >= 0.93)
  and away from the image border.
{src("stardist_img")}
{src("stardist_mask")}
  The shipped hand-made labels are used as they are, with the same filters. stardist's
  `stardist/data/__init__.py` describes the image as "Fluorescence microscopy image and mask from
  the 2018 kaggle DSB challenge" (Caicedo et al., Nature Methods 16, 2019). The DSB 2018 data are
  distributed by the Broad Bioimage Benchmark Collection as BBBC038, to our knowledge under CC0 1.0;
  the wheel itself does not state the image's licence (to be confirmed against the BBBC038 page).
- Not used: scikit-image's `human_mitosis`, `kidney` and `cells3d` are fetched from the network
  at run time (pooch), not shipped in the wheel.

## engineered.fasta

{out_hash("engineered.fasta")}

Sequences for CELL-E's in-silico experiments (CELL-E paper Sec. 2.3, Figs. 4-5).

{src("blast_pin")}
{src("blast_phr")}
{src("blast_psq")}
- GFP = UniProt P42212 (avGFP, 238 aa) and TOP1 = UniProt P11387 (human DNA topoisomerase 1,
  765 aa), read from that BLAST database (UniProtKB/Swiss-Prot as of January 2014, the package's
  `dataset_201401`). TOP1 is checked against
  the motifs the CELL-E paper quotes: KKHKEKE at aa 59-65 and KKIKTED at aa 150-156 match
  exactly; the paper's Motif III "KPKNKD (aa 174-180)" sits at 175-180 (aa 174-180 read KKPKNKD)
  and its Motif IV "KKPKKEE (aa 192-198)" at 193-199: the paper's boundaries are off by one there.
- NLS peptides exactly as printed in the paper: nucleoplasmin KRPAATKKAGQAKKKK and the peptide
  the paper attributes to N-Myc, PAAKRVKLD (this is the classic c-Myc NLS; we follow the paper).
- Random control peptide: the paper does not print it; ours ({info["random_peptide"]}) is drawn
  deterministically from the 20 standard residues (SHA-256 of the seed string in the header),
  rejecting draws with more than two K/R.
- TOP1 deletion constructs of Fig. 5 (Mo, Wang & Beck, J. Biol. Chem. 275, 2000): aa 1-199,
  1-146, 1-67 and 148-199. The paper (and Mo et al.) used eGFP fusions; we use avGFP P42212 for all
  constructs (EGFP differs by F64L/S65T/H231L and an inserted V after M1; no registry package
  checked here ships EGFP) and append fragments and peptides to the GFP C terminus with no linker
  (the vector's linker residues are not modelled).
- Header fields: `construct`, `peptide` / `region` (1-based, inclusive, in P11387), `source`,
  `ref`, `seed`.
"""
    (out / "PROVENANCE.md").write_text(text)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="asset directory (default: %(default)s)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="download cache (default: %(default)s)")
    ap.add_argument("--date", default=_dt.datetime.now(_dt.UTC).date().isoformat(), help="build date for PROVENANCE")
    args = ap.parse_args(argv)

    paths = fetch_inputs(args.cache.expanduser().resolve())
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmpdir:
        tmp = Path(tmpdir)
        df, log = build_proteins(paths["seqs"], paths["orgdb"], paths["godb"])
        write_proteins(df, tmp / "proteins.tsv")
        label_counts = {c: int((df["label"] == c).sum()) for c in COMPARTMENTS}
        arrays, nuclei_counts = build_nuclei(paths)
        write_npz(arrays, tmp / "nuclei.npz")
        recs = build_engineered(paths)
        write_fasta(recs, tmp / "engineered.fasta")
        for name in ("proteins.tsv", "nuclei.npz", "engineered.fasta"):
            (tmp / name).replace(out / name)
    n_nuclei = sum(nuclei_counts.values())
    info = {
        **log,
        "n_proteins": len(df),
        "label_counts": label_counts,
        "nuclei_counts": f"{n_nuclei} nuclei: {nuclei_counts['mahotas']} from mahotas, "
        f"{nuclei_counts['stardist']} from stardist.",
        "random_peptide": next(f["peptide"] for r, f, _ in recs if r == "GFP_random_peptide"),
    }
    write_provenance(out, paths, args.date, info)

    print(f"proteins: {len(df)} of {log['records']} records; dropped {dict(log['dropped'])}")  # type: ignore[call-overload]
    print("evidence lines seen (go_cc):", dict(log["evidence_lines"].most_common()))  # type: ignore[union-attr]
    for c, n in label_counts.items():
        flag = "  <-- fewer than 5" if n < 5 else ""
        print(f"  {c:17s} {n:4d}{flag}")
    print(f"nuclei: {n_nuclei} ({dict(nuclei_counts)})")
    print("engineered:", ", ".join(r for r, _, _ in recs))
    for name in ("proteins.tsv", "nuclei.npz", "engineered.fasta", "PROVENANCE.md"):
        print(f"  {name:17s} {(out / name).stat().st_size:9d} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
