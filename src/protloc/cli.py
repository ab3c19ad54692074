"""The ``protloc`` command line.

``main(argv)`` is callable from tests and returns the exit code. User errors (any
:class:`protloc.errors.ProtlocError`) print one line and exit with status 2; ``--debug`` shows the
traceback. Logging handlers are configured here and nowhere else.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import re
import signal
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from protloc import __version__
from protloc._fs import release_outputs
from protloc.errors import ProtlocError


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the example blocks as written and show defaults."""


# ---------------------------------------------------------------------------------------- option types
# Every count, size, seed, fraction and device is checked here, when the command line is parsed: a bad
# value is one line naming the option (argparse: "argument --batch-size: ..."), before any work, and the
# accepted range is written into the option's --help (_state_ranges).
class _Number:
    """An argparse ``type`` for a number in a range; ``range_text`` goes into the option's help."""

    def __init__(self, kind: type, lo: float | None, hi: float | None = None, *, lo_open: bool = False) -> None:
        self.kind, self.lo, self.hi, self.lo_open = kind, lo, hi, lo_open
        word = "integer" if kind is int else "number"
        show = (lambda v: str(int(v))) if kind is int else (lambda v: f"{v:g}")
        parts = []
        if lo is not None:
            parts.append(f"{'>' if lo_open else '>='} {show(lo)}")
        if hi is not None:
            parts.append(f"<= {show(hi)}")
        self.range_text = f"{word} {' and '.join(parts)}".strip()
        self.article = "an" if kind is int else "a"
        self.__name__ = word  # what argparse calls the type

    def __call__(self, text: str) -> int | float:
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.article} {self.range_text}, got {text!r}") from None
        if self.kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite {self.range_text}, got {text!r}")
        low_bad = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        if low_bad or (self.hi is not None and value > self.hi):
            raise argparse.ArgumentTypeError(f"expected {self.article} {self.range_text}, got {text}")
        return value


#: At least one (counts of things to make, sizes, batch sizes, workers).
_COUNT = _Number(int, 1)
#: Zero or more (0 usually means "all" or "none", as the help says).
_COUNT0 = _Number(int, 0)
#: Seeds: what NumPy's and PyTorch's generators all accept.
_SEED = _Number(int, 0, 2**32 - 1)
_POSITIVE = _Number(float, 0, lo_open=True)
_FRACTION = _Number(float, 0, 1, lo_open=True)


def _device(text: str) -> str:
    """A torch device this machine has: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (use cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text!r}: this torch has no usable CUDA device (a CPU-only build, or no GPU); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text!r}: protloc runs on cpu, cuda or mps")
    return text


_device.range_text = "cpu, cuda, cuda:N or mps"  # type: ignore[attr-defined]


def _state_ranges(parser: argparse.ArgumentParser) -> None:
    """Write each typed option's accepted range into its help, in every subcommand."""
    for action in parser._actions:
        text = getattr(action.type, "range_text", None)
        if text and action.help and action.help is not argparse.SUPPRESS and text not in action.help:
            action.help = f"{action.help} [{text}]"
        elif text and not action.help:
            action.help = f"[{text}]"
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                _state_ranges(sub)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _sub(subparsers, name: str, *, help: str, description: str, example: str) -> argparse.ArgumentParser:
    epilog = "example:\n" + textwrap.indent(textwrap.dedent(example).strip(), "  ")
    return subparsers.add_parser(name, help=help, description=description, epilog=epilog, formatter_class=_Formatter)


# --------------------------------------------------------------------------------------------- world
def _cmd_world_make(args: argparse.Namespace) -> int:
    from protloc.data.world.make import make_world

    t0 = time.perf_counter()
    out = make_world(
        args.out,
        proteins=args.proteins,
        fovs=args.fovs,
        seed=args.seed,
        size=args.size,
        mode=args.mode,
        z=args.z,
        include_engineered=not args.no_engineered,
        partitions=_partitions(args.partition),
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    meta = json.loads((Path(out) / "world.json").read_text())
    counts = meta.get("counts", {})
    print(
        f"world written to {out} in {time.perf_counter() - t0:.1f} s: "
        + ", ".join(f"{k}={v}" for k, v in counts.items())
    )
    return 0


def _partition_arg(value: str) -> tuple[str, int | None]:
    name, _, count = value.partition("=")
    if name not in ("train", "val", "test"):
        raise argparse.ArgumentTypeError(f"partition must be train, val or test (optionally =N), got {value!r}")
    if not count:
        return name, None
    try:
        n = int(count)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: the number of proteins must be a positive integer")
    return name, n


def _partitions(values: list[tuple[str, int | None]] | None) -> list[str] | dict[str, int] | None:
    if not values:
        return None
    from protloc.errors import ConfigError

    counted = [n is not None for _, n in values]
    if any(counted) and not all(counted):
        raise ConfigError("--partition: give every partition a count (NAME=N) or none")
    if all(counted):
        return {name: int(n) for name, n in values if n is not None}
    return [name for name, _ in values]


def _add_world(subparsers) -> None:
    p = subparsers.add_parser(
        "world",
        help="the reference cell world (embedded default data with known truth)",
        description="Generate OpenCell-like fields of view whose ground truth is known.",
        epilog="example:\n  protloc world make --out runs/world --proteins 100 --fovs 4",
        formatter_class=_Formatter,
    )
    wsub = p.add_subparsers(dest="world_command", metavar="COMMAND", required=True)
    m = _sub(
        wsub,
        "make",
        help="render a reference world to a folder",
        description=(
            "Render fields of view (2-channel uint16 TIFFs: Hoechst-like nucleus + tagged protein) for real "
            "human proteins with GO-derived localization (mode 'real': the 384 asset proteins; mode 'proteome': "
            "the shipped human table with its homology partition) or for synthetic sequences whose "
            "localization follows planted sequence signals (mode 'synthetic'), plus per-protein truth."
        ),
        example="protloc world make --out runs/world --proteins 100 --fovs 4 --seed 0",
    )
    m.add_argument("--out", required=True, type=Path, help="output folder")
    m.add_argument("--proteins", type=_COUNT0, default=100, help="number of proteins (0 = all shipped ones)")
    m.add_argument("--fovs", type=_COUNT, default=4, help="fields of view per protein")
    m.add_argument("--seed", type=_SEED, default=0)
    m.add_argument("--size", type=_COUNT, default=512, help="field-of-view side in pixels (~0.4 um/pixel)")
    m.add_argument(
        "--mode",
        choices=["real", "proteome", "synthetic"],
        default="real",
        help="real: the 384 asset proteins; proteome: a sample of the shipped human table (15,172 proteins) "
        "with its homology partition, which becomes the CELL-E split of `protloc prepare`; synthetic: "
        "generated proteins with planted signals",
    )
    m.add_argument(
        "--partition",
        action="append",
        type=_partition_arg,
        default=None,
        metavar="NAME[=N]",
        help="proteome mode: draw only from this partition of the human table (train, val or test; "
        "repeatable; e.g. test for a world of held-out proteins); NAME=N: N proteins of it (then "
        "--proteins is not used)",
    )
    m.add_argument("--z", type=_COUNT, default=1, help="z-slices per field (>1 writes *_stack.tif z-stacks)")
    m.add_argument("--no-engineered", action="store_true", help="leave out the engineered GFP/NLS constructs")
    m.add_argument("--workers", type=_COUNT, default=1, help="worker processes")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    m.set_defaults(func=_cmd_world_make, _proteins_zero_is_all=True)


# ------------------------------------------------------------------------------------------- prepare
def _cmd_prepare(args: argparse.Namespace) -> int:
    from protloc.commands.prepare import run_prepare

    summary = run_prepare(
        args.fovs,
        args.out,
        sequences=args.sequences,
        config=args.config,
        overrides=args.set or [],
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.quiet,
        resume=not args.no_resume,
    )
    _print_table("prepared", summary)
    return 0


def _add_prepare(subparsers) -> None:
    p = _sub(
        subparsers,
        "prepare",
        help="fields of view -> cytoself and CELL-E crop stores + manifests",
        description=(
            "Preprocess OpenCell-like fields of view as the cytoself and CELL-E methods do: z max projection, "
            "2x XY binning, nucleus segmentation (Gaussian + Li threshold + watershed), signed nuclear "
            "distance in [-1, 1], cell-centred crops (100 px for cytoself, 256 px for CELL-E) away from edges, "
            "[0, 1] intensities, CELL-E thresholds (pixel >= mean); splits written to the manifests.\n\n"
            "FOVS is a CSV/TSV with columns fov_id, protein_id, path (a *_stack.tif ZCYX or *_proj.tif CYX "
            "file, channel 0 nucleus, channel 1 protein) and optionally label, sequence, downsample."
        ),
        example="""
        protloc prepare --fovs runs/world/fovs.csv --sequences runs/world/sequences.fasta --out runs/prepared
        protloc prepare --fovs fovs.csv --out prep --set celle_split.by=homology --set celle_split.identity=0.4
        """,
    )
    p.add_argument("--fovs", required=True, type=Path, help="field-of-view table (CSV/TSV)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--sequences", type=Path, default=None, help="FASTA of protein sequences (ids = protein_id)")
    p.add_argument("--config", type=Path, default=None, help="YAML file with PrepareConfig keys")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. params.sigma=1.5")
    p.add_argument("--workers", type=_COUNT, default=1, help="worker processes over fields of view")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="keep no per-field results in OUT.partial (saves temporary disk; an interrupted run restarts)",
    )
    p.set_defaults(func=_cmd_prepare)


# -------------------------------------------------------------------------------------------- import
def _cmd_import_cytoself(args: argparse.Namespace) -> int:
    from protloc.data.imports import import_cytoself_crops

    summary = import_cytoself_crops(
        args.src,
        args.out,
        seed=args.seed,
        fractions=args.fractions,
        stratify=args.stratify,
        crop_size=args.crop_size,
        rescale=not args.as_released,
        allow_crop_split=args.split_by_crop,
        store_dtype=args.dtype,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    _print_table("imported cytoself crops", summary)
    print(f"next: protloc train cytoself --store {Path(args.out) / 'cytoself.zarr'} --out runs/cytoself")
    return 0


def _cmd_import_celle(args: argparse.Namespace) -> int:
    from protloc.data.imports import import_celle_manifest

    summary = import_celle_manifest(
        args.manifest,
        args.out,
        image_size=args.image_size,
        keep_split=not args.ignore_split,
        fractions=args.fractions,
        seed=args.seed,
        store_dtype=args.dtype,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    _print_table("imported CELL-E manifest", summary)
    print(f"next: protloc train vqgan --kind nucleus --store {Path(args.out) / 'celle.zarr'} --out runs/vq_nucleus")
    return 0


def _add_import(subparsers) -> None:
    p = subparsers.add_parser(
        "import",
        help="cytoself's released crops or a CELL-E manifest -> crop stores (instead of prepare)",
        description=(
            "Write data that comes already cut into the crop stores `protloc train` and `protloc embed` read, with "
            "the channels, value ranges, splits and side files of `protloc prepare`."
        ),
        epilog="example:\n  protloc import cytoself-crops --src released/ --out cytoself_data",
        formatter_class=_Formatter,
    )
    isub = p.add_subparsers(dest="import_command", metavar="SOURCE", required=True)
    c = _sub(
        isub,
        "cytoself-crops",
        help="cytoself's released crops (Image_data*.npy + Label_data*.csv, or <name>_pro.npy ...) -> cytoself.zarr",
        description=(
            "Read cytoself's released crops, either the full set (Image_dataXX.npy [N, 100, 100, 4] with "
            "Label_dataXX.csv) or per protein (<name>_pro.npy, <name>_nuc.npy, <name>_nucdist.npy, <name>_label.csv), "
            "and write OUT/cytoself.zarr + cytoself.csv (protein, nucleus in [0, 1], nucleus_distance in [-1, 1], "
            "scaled per crop as `protloc prepare` does), OUT/proteins.csv and OUT/summary.json. protein_id comes from "
            "the label column 'name' (else 'ensg'), label from 'loc_grade1'; crops are split 8:1:1 by field of view "
            "(FOV_id), as `prepare` splits. Label tables without FOV_id are refused unless --split-by-crop."
        ),
        example="""
        protloc import cytoself-crops --src released/ --out cytoself_data
        protloc import cytoself-crops --src released/ --out cytoself_data --seed 1 --fractions reference --overwrite
        """,
    )
    c.add_argument("--src", required=True, type=Path, help="folder of the released .npy / .csv files")
    c.add_argument("--out", required=True, type=Path, help="output folder (must not exist or be empty)")
    c.add_argument("--seed", type=_SEED, default=0, help="split seed")
    c.add_argument(
        "--fractions",
        default="paper",
        help="split fractions: paper (0.8/0.1/0.1), reference (0.82/0.098/0.082) or train=..,val=..,test=..",
    )
    c.add_argument("--stratify", action="store_true", help="split each protein's fields of view separately")
    c.add_argument("--crop-size", type=_COUNT, default=100, help="expected crop side in pixels")
    c.add_argument(
        "--split-by-crop",
        action="store_true",
        help="split crops without a FOV_id one by one instead of refusing (neighbours may straddle splits)",
    )
    c.add_argument("--as-released", action="store_true", help="store the values as released, without rescaling")
    c.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="type of the stored crops")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    c.set_defaults(func=_cmd_import_cytoself)

    m = _sub(
        isub,
        "celle-manifest",
        help="a CELL-E manifest (nucleus / protein image pairs + sequences) -> celle.zarr",
        description=(
            "Read a CELL-E manifest (CSV/TSV: nucleus_image, protein_image, protein_id, sequence or metadata_json, "
            "optional split, label, fov_id) and write OUT/celle.zarr + celle.csv (nucleus, protein in [0, 1], "
            "threshold = protein >= mean, as `protloc prepare` writes them), OUT/sequences.fasta, OUT/proteins.csv "
            "and OUT/summary.json. One crop per row: images larger than --image-size are centre-cropped, smaller ones "
            "refused. The manifest's split column is kept; without one, proteins are split 80/20."
        ),
        example="""
        protloc import celle-manifest --manifest manifest.csv --out celle_data
        protloc import celle-manifest --manifest manifest.tsv --out celle_data --ignore-split --seed 1 --overwrite
        """,
    )
    m.add_argument("--manifest", required=True, type=Path, help="the CELL-E manifest (CSV/TSV)")
    m.add_argument("--out", required=True, type=Path, help="output folder (must not exist or be empty)")
    m.add_argument("--image-size", type=_COUNT, default=256, help="crop side in pixels (larger images: centre crop)")
    m.add_argument(
        "--ignore-split", action="store_true", help="split proteins 80/20 even when the manifest has a split column"
    )
    m.add_argument("--fractions", default="paper", help="protein split fractions: paper (0.8/0.2) or train=..,val=..")
    m.add_argument("--seed", type=_SEED, default=0, help="protein split seed")
    m.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="type of the stored images")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    m.set_defaults(func=_cmd_import_celle)


# ---------------------------------------------------------------------------------------------- demo
def _cmd_demo(args: argparse.Namespace) -> int:
    from protloc.demo import DemoConfig, run_demo

    config = DemoConfig(
        proteins=args.proteins or None,
        fovs=args.fovs,
        seed=args.seed,
        workers=args.workers,
        train=args.train,
        train_scale=args.train_scale,
        allow_mismatch=args.allow_mismatch,
        eval_crops=args.eval_crops or None,
        gallery=args.gallery,
        samples=args.samples,
        construct_nuclei=args.construct_nuclei,
        celle_proteins=args.celle_proteins,
        celle_train_proteins=args.celle_train_proteins,
        celle_fovs=args.celle_fovs,
        device=args.device or "cpu",
        precision=args.precision,
    )
    metrics = run_demo(args.out, config=config, fresh=args.fresh, progress=not args.quiet)
    stages = {
        k: ("reused" if v.get("reused") else f"{v.get('seconds', 0):.0f} s") for k, v in metrics["stages"].items()
    }
    _print_table("demo stages", stages)
    _print_table("demo results", metrics.get("summary", {}))
    print(f"report: {Path(args.out) / 'report' / 'index.html'}")
    return 0


def _add_demo(subparsers) -> None:
    p = _sub(
        subparsers,
        "demo",
        help="both papers' main results on the embedded reference world -> OUT/report/index.html",
        description=(
            "Build the reference cell world (all 384 proteins x 4 fields of view), prepare its crops, then -- with "
            "the shipped weights, or with --train from their recipes -- embed the test crops with cytoself, "
            "draw the UMAP atlas, feature spectra and feature zeroing, evaluate CELL-E on held-out proteins beside "
            "the VQGAN ceiling and a sequence-only baseline, predict a gallery of held-out proteins, run the GFP / "
            "GFP+NLS experiment and two in-silico screens, and write a self-contained HTML report with PNGs and "
            "metrics.json. Finished stages are reused: an interrupted demo resumes where it stopped. With the shipped "
            "weights it takes a few minutes on 2 CPU cores; --train trains the four models first from the recipes "
            "the shipped weights came from (about an hour on 2 cores; --train-scale 0.2 shortens every schedule)."
        ),
        example="""
        protloc demo
        protloc demo --train
        protloc demo --train --train-scale 0.2 --out runs/demo_quick
        """,
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    p.add_argument("--train", action="store_true", help="train the models instead of using the shipped weights")
    p.add_argument("--train-scale", type=_POSITIVE, default=1.0, help="multiply every training schedule by this")
    p.add_argument("--proteins", type=_COUNT0, default=0, help="reference-world proteins (0 = all 384)")
    p.add_argument("--fovs", type=_COUNT, default=4, help="fields of view per protein")
    p.add_argument("--seed", type=_SEED, default=0)
    p.add_argument("--workers", type=_COUNT, default=2, help="processes for building and preparing the world")
    p.add_argument(
        "--allow-mismatch",
        action="store_true",
        help="use the shipped weights on a non-default world (the report warns)",
    )
    p.add_argument("--eval-crops", type=_COUNT0, default=400, help="held-out crops evaluated (0 = all)")
    p.add_argument("--gallery", type=_COUNT0, default=8, help="held-out proteins in the prediction gallery")
    p.add_argument("--samples", type=_COUNT, default=8, help="draws per CELL-E prediction")
    p.add_argument("--construct-nuclei", type=_COUNT, default=8, help="nucleus images of the GFP/NLS experiment")
    p.add_argument(
        "--celle-proteins",
        type=_COUNT,
        default=300,
        help="CELL-E's world: held-out (test-partition) proteins of the human table imaged for the CELL-E stages",
    )
    p.add_argument(
        "--celle-train-proteins",
        type=_COUNT,
        default=2400,
        help="with --train: proteins of CELL-E's world, drawn from every partition (trained on the train one)",
    )
    p.add_argument("--celle-fovs", type=_COUNT, default=2, help="fields of view per protein of CELL-E's world")
    p.add_argument("--device", type=_device, default=None, help="torch device (default: cpu)")
    p.add_argument("--precision", choices=["fp32", "bf16", "int8"], default="fp32", help="CELL-E precision")
    p.add_argument("--fresh", action="store_true", help="delete a previous demo in OUT first")
    p.set_defaults(func=_cmd_demo)


# ------------------------------------------------------------------------------------------- weights
def _cmd_weights(args: argparse.Namespace) -> int:
    from protloc.errors import ConfigError
    from protloc.pretrained import PREFIX, list_pretrained, read_recipe, weights_dir

    if args.name:
        recipe = read_recipe(args.name)
        if args.write_config is not None:
            import yaml

            from protloc._fs import atomic_write_text, check_overwrite

            check_overwrite(args.write_config, overwrite=args.overwrite, ours=_is_training_config)
            atomic_write_text(args.write_config, yaml.safe_dump(recipe["training_config"], sort_keys=False))
            print(f"training config of {args.name} written to {args.write_config}; reproduce it with:")
            print("  " + recipe["command"].replace("recipe.yaml", str(args.write_config)))
            return 0
        print(json.dumps(recipe, indent=2))
        return 0
    if args.write_config is not None:
        raise ConfigError("--write-config needs a model NAME")
    print(f"shipped models in {weights_dir()} (use as --checkpoint {PREFIX}NAME):")
    for row in list_pretrained():
        if not row["available"]:
            print(f"  {row['name']:<22} MISSING from this installation")
            continue
        print(f"  {row['name']:<22} {row['megabytes']:>5.2f} MB  {row['steps']:>5} steps  {row['summary']}")
    print("trained on: " + (list_pretrained()[0].get("trained_on") or "?"))
    print("details (training config, command, validation, float16 fidelity): protloc weights NAME")
    return 0


def _is_training_config(path: Path) -> bool:
    """Whether ``path`` holds a training configuration (a mapping with ``model`` and ``data``), as
    ``--write-config`` writes: what --overwrite may replace."""
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(loaded, dict) and {"model", "data"} <= set(loaded)


def _add_weights(subparsers) -> None:
    p = _sub(
        subparsers,
        "weights",
        help="list the shipped models (or show one's recipe)",
        description=(
            "protloc ships small models trained on the reference cell world and on Swiss-Prot: cytoself-small "
            "(the default --checkpoint of embed and interpret), cytoself-tiny, the CELL-E tokenizers "
            "vqgan-nucleus-tiny and vqgan-threshold-tiny, celle-tiny (the default of predict, screen and "
            "evaluate) with its ablations, and encoder-small (localize). They are what `protloc demo` uses unless "
            "--train. With NAME, print "
            "its recipe.json: training configuration, the command that reproduces it, the world it saw, its "
            "validation numbers and how close the float16-stored copy is to the float32 original."
        ),
        example="""
        protloc weights
        protloc weights celle-tiny
        protloc weights celle-tiny --write-config celle_recipe.yaml
        protloc predict --checkpoint pretrained:celle-tiny --sequence MSKGEELFTG --out pred
        """,
    )
    p.add_argument("name", nargs="?", default=None, help="a shipped model to describe")
    p.add_argument(
        "--write-config",
        type=Path,
        default=None,
        metavar="YAML",
        help="write NAME's training configuration to this YAML (for `protloc train ... --config`)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --write-config file")
    p.set_defaults(func=_cmd_weights)


# --------------------------------------------------------------------------------------------- train
def _train(args: argparse.Namespace, model: str, **options) -> tuple[object, dict]:
    """The configuration (:func:`protloc.commands.train.train_config`) and summary of one training run."""
    from protloc.commands.train import run_train, train_config

    cfg = train_config(
        model,
        out=args.out,
        store=getattr(args, "store", None),
        preset=args.preset,
        config=args.config,
        overrides=args.set or [],
        resume=args.resume,
        **options,
    )
    return cfg, run_train(cfg, out=args.out, resume=args.resume, progress=not args.quiet)


def _cmd_train_cytoself(args: argparse.Namespace) -> int:
    _, summary = _train(args, "cytoself")
    _print_table("train cytoself", summary)
    return 0


def _cmd_train_vqgan(args: argparse.Namespace) -> int:
    cfg, summary = _train(args, "vqgan", kind=args.kind)
    _print_table(f"train vqgan ({cfg.kind})", {k: v for k, v in summary.items() if k != "last_val"})
    _print_table("last validation", summary["last_val"])
    return 0


def _cmd_train_celle(args: argparse.Namespace) -> int:
    _, summary = _train(
        args,
        "celle",
        sequences=args.sequences,
        nucleus_vqgan=args.nucleus_vqgan,
        threshold_vqgan=args.threshold_vqgan,
    )
    _print_table("train celle", {k: v for k, v in summary.items() if k != "last_val"})
    _print_table("last validation", summary["last_val"])
    return 0


def _cmd_train_encoder(args: argparse.Namespace) -> int:
    _, summary = _train(args, "encoder", corpus=args.corpus)
    _print_table("train encoder", {k: v for k, v in summary.items() if k != "last_val"})
    _print_table("last validation", summary["last_val"])
    return 0


def _common_train_args(
    p: argparse.ArgumentParser, store_help: str | None, presets: tuple[str, ...] = ("tiny", "paper")
) -> None:
    if store_help is not None:
        p.add_argument("--store", type=Path, default=None, help=store_help)
    p.add_argument("--out", required=True, type=Path, help="run folder")
    p.add_argument("--preset", choices=list(presets), default="tiny", help="starting configuration")
    p.add_argument("--config", type=Path, default=None, help="YAML file applied on top of the preset")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. schedule.max_steps=200")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/last with the run's own OUT/config.yaml (options given now override it)",
    )


def _add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model (cytoself, CELL-E's VQGAN tokenizers, CELL-E, the protein encoder)",
        description="Train a model with an explicit, resumable, step-counted loop (Hugging Face Accelerate).",
        epilog="example:\n  protloc train cytoself --store runs/prepared/cytoself.zarr --out runs/cytoself",
        formatter_class=_Formatter,
    )
    tsub = p.add_subparsers(dest="train_command", metavar="MODEL", required=True)
    c = _sub(
        tsub,
        "cytoself",
        help="cytoself: VQ-VAE-2 with split quantization and protein-ID heads",
        description=(
            "Train cytoself on a crop store from `protloc prepare`: Adam 4e-4, random rotations/flips, lr x0.1 after "
            "4 validation checks without improvement, stop after 12 (paper); checkpoints in OUT/best and OUT/last "
            "(model.safetensors + config.json + trainer_state.pt), metrics in OUT/metrics.jsonl. "
            "Multi-GPU: `accelerate launch -m protloc train cytoself ...`."
        ),
        example="""
        protloc train cytoself --store runs/prepared/cytoself.zarr --out runs/cytoself --set schedule.max_steps=500
        protloc train cytoself --preset paper --config configs/cytoself/paper.yaml --store prep/cytoself.zarr --out run
        protloc train cytoself --store prep/cytoself.zarr --out run --resume
        """,
    )
    _common_train_args(c, "crop store (OUT/cytoself.zarr of protloc prepare)", presets=("tiny", "small", "paper"))
    c.set_defaults(func=_cmd_train_cytoself)

    v = _sub(
        tsub,
        "vqgan",
        help="CELL-E's image tokenizers: a VQGAN for nucleus or for protein-threshold images",
        description=(
            "Train a CELL-E image tokenizer (taming-style VQGAN) on the CELL-E crop store of `protloc prepare`: "
            "--kind nucleus (Phase 1) or --kind threshold (Phase 2, protein images binarized at their mean). "
            "MSE reconstruction, then a PatchGAN hinge loss from loss.disc_start with the adaptive weight; Adam "
            "4.5e-6 in the paper preset. Logs codebook perplexity and dead codes; for threshold images the "
            "pixel and nucleus-proportion accuracy of the reconstructions (the paper's ceiling). "
            "Multi-GPU: `accelerate launch -m protloc train vqgan ...`."
        ),
        example="""
        protloc train vqgan --kind nucleus --store runs/demo/prepared/celle.zarr --out runs/vq_nucleus
        protloc train vqgan --kind threshold --store runs/demo/prepared/celle.zarr --out runs/vq_threshold
        protloc train vqgan --kind nucleus --preset paper --store prep/celle.zarr --out vq --set data.batch_size=16
        """,
    )
    _common_train_args(v, "CELL-E crop store (OUT/celle.zarr of protloc prepare)")
    v.add_argument("--kind", choices=["nucleus", "threshold"], default=None, help="tokenizer (default: the config's)")
    v.set_defaults(func=_cmd_train_vqgan)

    e = _sub(
        tsub,
        "celle",
        help="CELL-E: transformer from sequence + nucleus tokens to protein-threshold tokens",
        description=(
            "Train the CELL-E transformer with two frozen VQGAN tokenizers (`protloc train vqgan`) on the CELL-E "
            "crop store: [BOS + residues | nucleus tokens | threshold tokens], weighted cross-entropy 1/9, 1/9, "
            "8/9, Adam 3e-4 (paper); --set model.mode=masked trains the non-autoregressive (CELL-E 2) variant; "
            "--set data.text=none trains the 'no sequence' ablation. Validation losses per segment in "
            "OUT/metrics.jsonl. Multi-GPU: `accelerate launch -m protloc train celle ...`."
        ),
        example="""
        protloc train celle --store runs/demo/prepared/celle.zarr --nucleus-vqgan runs/vq_nucleus \\
            --threshold-vqgan runs/vq_threshold --out runs/celle
        protloc train celle --preset paper --store prep/celle.zarr --nucleus-vqgan vqn --threshold-vqgan vqt \\
            --out celle --set model.embedder=esm2 --set embedder.path=/models/esm2_t12.pt \\
            --set model.text_dim=480 --set model.text_projection=true
        """,
    )
    _common_train_args(e, "CELL-E crop store (OUT/celle.zarr of protloc prepare)")
    e.add_argument("--sequences", type=Path, default=None, help="FASTA or table (default: beside the store)")
    e.add_argument("--nucleus-vqgan", type=Path, default=None, help="nucleus tokenizer run or checkpoint folder")
    e.add_argument("--threshold-vqgan", type=Path, default=None, help="threshold tokenizer run or checkpoint folder")
    e.set_defaults(func=_cmd_train_celle)

    n = _sub(
        tsub,
        "encoder",
        help="protein sequence encoder: residues -> localization (12 compartments + nucleus), per-residue vectors",
        description=(
            "Train the protein sequence encoder (dilated CNN + transformer, light-attention pooling) on the "
            "Swiss-Prot GO cellular-component corpus of scripts/build_protein_corpus.py: presence BCE + distribution "
            "cross-entropy + masked-residue loss, AdamW with warm-up and cosine decay, token-budget batches with "
            "human proteins up-weighted (data.human_weight). Validates on the human val partition (per-compartment "
            "AUROC; best/ on the highest macro AUROC). --set data.human_only=true trains the human-only baseline; "
            "--set mixed_precision=bf16 trains under bfloat16 autocast (also on CPU)."
        ),
        example="""
        protloc train encoder --preset small --corpus ~/.cache/protloc/protein-corpus/corpus.tsv.gz --out runs/encoder
        protloc train encoder --preset small --corpus corpus.tsv.gz --out runs/encoder --resume
        """,
    )
    _common_train_args(n, None, presets=("tiny", "small"))
    n.add_argument("--corpus", type=Path, default=None, help="corpus.tsv.gz (default: the config's data.corpus)")
    n.set_defaults(func=_cmd_train_encoder)


# --------------------------------------------------------------------------------------------- embed
def _cmd_embed(args: argparse.Namespace) -> int:
    from protloc.commands.embed import run_embed

    path = run_embed(
        args.store,
        args.out,
        checkpoint=args.checkpoint,
        split=args.split,
        batch_size=args.batch_size,
        include_local=args.include_local,
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.quiet,
        shard_size=args.shard_size,
    )
    print(f"embeddings written to {path}")
    return 0


def _add_embed(subparsers) -> None:
    p = _sub(
        subparsers,
        "embed",
        help="cytoself localization encodings of every crop -> AnnData (.h5ad)",
        description=(
            "Encode crops with a trained cytoself model (eval mode): obsm['global'] (flattened global representation, "
            "the atlas input), obsm['global_indices'] and obsm['local_indices'] (code indices, for feature spectra), "
            "optionally obsm['local']. obs carries protein_id, fov_id, split and label. Memory stays bounded."
        ),
        example="protloc embed --checkpoint runs/cytoself --store runs/prepared/cytoself.zarr --out runs/emb.h5ad",
    )
    p.add_argument("--checkpoint", default=None, help=_CKPT_HELP.format(default="cytoself-small"))
    p.add_argument("--store", required=True, type=Path, help="crop store")
    p.add_argument("--out", required=True, type=Path, help="output .h5ad")
    p.add_argument("--split", default=None, help="only this split (train/val/test)")
    p.add_argument("--batch-size", type=_COUNT, default=256)
    p.add_argument("--include-local", action="store_true", help="also store the full local representation")
    p.add_argument(
        "--shard-size",
        type=_COUNT,
        default=4096,
        help="crops per resumable shard: run the same command again after an interruption to continue",
    )
    p.add_argument("--device", type=_device, default=None, help="torch device (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_embed)


def _cmd_atlas(args: argparse.Namespace) -> int:
    from protloc.commands.atlas import run_atlas

    result = run_atlas(
        args.embeddings,
        args.out,
        split=None if args.split == "all" else args.split,
        label_key=args.label_key,
        complexes=args.complexes,
        store=args.store,
        seed=args.seed,
        max_thumbnails=args.thumbnails,
        overwrite=args.overwrite,
    )
    cs = result["clustering_score"]
    knn = result.get("knn", {}).get("features", {})
    _print_table(
        "atlas",
        {
            "crops": result["n_crops"],
            "proteins": result["n_proteins"],
            "clustering score (localization)": _fmt(cs.get("localization")),
            "clustering score (complexes)": _fmt(cs.get("complex")),
            "k-NN macro-F1": _fmt(knn.get("macro_f1")),
        },
    )
    print(f"atlas written to {args.out}")
    return 0


def _add_atlas(subparsers) -> None:
    p = _sub(
        subparsers,
        "atlas",
        help="UMAP localization atlas + clustering score + k-NN macro-F1",
        description=(
            "UMAP (umap-learn, paper defaults: euclidean, 15 neighbours, min_dist 0.1) of the global encodings of one "
            "split, coloured by localization: atlas.png and a self-contained interactive atlas.html (hover: protein, "
            "label, crop). Scores: the paper's clustering score (spread of class centres over the median within-class "
            "radius in the UMAP) for localization classes and, with --complexes, protein complexes; leave-protein-out "
            "k-NN localization macro-F1 on the encodings."
        ),
        example="protloc atlas --embeddings runs/emb.h5ad --store runs/prepared/cytoself.zarr --out runs/atlas",
    )
    p.add_argument("--embeddings", required=True, type=Path, help=".h5ad from protloc embed")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--split", default="test", help="split to map, or 'all'")
    p.add_argument("--label-key", default="label", help="obs column of localization labels")
    p.add_argument("--complexes", type=Path, default=None, help="CSV/TSV with protein_id, complex")
    p.add_argument("--store", type=Path, default=None, help="crop store, for hover thumbnails")
    p.add_argument("--thumbnails", type=_COUNT0, default=600, help="at most this many hover thumbnails")
    p.add_argument("--seed", type=_SEED, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    p.set_defaults(func=_cmd_atlas)


def _cmd_spectrum(args: argparse.Namespace) -> int:
    from protloc.commands.spectrum import run_spectrum

    summary = run_spectrum(
        args.embeddings,
        args.out,
        split=None if args.split == "all" else args.split,
        label_key=args.label_key,
        queries=args.query or [],
        n_clusters=args.clusters,
        level=args.level,
        overwrite=args.overwrite,
    )
    _print_table("spectrum", {k: v for k, v in summary.items() if k != "queries"})
    for q, r in summary["queries"].items():
        print(f"  {q} (label {r['label'] or '?'}): closest family {r['best_family']} (r = {r['r']:.3f})")
    print(f"spectra written to {args.out}")
    return 0


def _add_spectrum(subparsers) -> None:
    p = _sub(
        subparsers,
        "spectrum",
        help="feature spectra, biclustering, localization-family correlation",
        description=(
            "Histogram of local code indices per protein (feature spectrum), Pearson correlation between code "
            "profiles, hierarchical biclustering and top-level feature clusters (paper Fig. 4); for --query proteins, "
            "their spectrum and its correlation with each localization family's consensus (Fig. 4e)."
        ),
        example="protloc spectrum --embeddings runs/emb.h5ad --out runs/spectrum --query GFP_NLS --query TOP1",
    )
    p.add_argument("--embeddings", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--split", default="all", help="crops of one split, or 'all'")
    p.add_argument("--label-key", default="label")
    p.add_argument("--query", action="append", metavar="PROTEIN", help="protein to profile (repeatable)")
    p.add_argument("--clusters", type=_COUNT, default=11, help="top-level feature clusters")
    p.add_argument("--level", choices=["local", "global"], default="local")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    p.set_defaults(func=_cmd_spectrum)


def _cmd_interpret(args: argparse.Namespace) -> int:
    from protloc.commands.interpret import run_interpret

    summary = run_interpret(
        _checkpoint(args.checkpoint, "cytoself-small"),
        args.store,
        args.out,
        protein=args.protein,
        top=args.top,
        n_crops=args.crops,
        split=args.split,
        level=args.level,
        overwrite=args.overwrite,
    )
    _print_table("feature zeroing", summary)
    return 0


def _add_interpret(subparsers) -> None:
    p = _sub(
        subparsers,
        "interpret",
        help="feature zeroing: what a protein's strongest codes draw (paper Fig. 5)",
        description=(
            "Zero each of a protein's most frequent codes before decoding and map the difference to the full "
            "reconstruction (in red over the crop)."
        ),
        example="protloc interpret --checkpoint runs/cytoself --store runs/prepared/cytoself.zarr --protein NPM1 "
        "--out runs/interpret",
    )
    p.add_argument("--checkpoint", default=None, help=_CKPT_HELP.format(default="cytoself-small"))
    p.add_argument("--store", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--protein", required=True)
    p.add_argument("--top", type=_COUNT, default=3, help="codes to zero")
    p.add_argument("--crops", type=_COUNT, default=4, help="crops to show")
    p.add_argument("--split", default=None)
    p.add_argument("--level", choices=["local", "global"], default="local")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    p.set_defaults(func=_cmd_interpret)


# ------------------------------------------------------------------------------------------- predict
def _add_sampling_options(
    p: argparse.ArgumentParser,
    *,
    top_k_help: str = "share of threshold codes kept (paper: 0.25)",
    steps_help: str = "decoding passes of a masked (CELL-E 2) model",
) -> None:
    """--temperature, --top-k-fraction and --steps of the CELL-E commands (SamplingConfig)."""
    p.add_argument("--temperature", type=_POSITIVE, default=1.0, help="sampling temperature (> 0)")
    p.add_argument("--top-k-fraction", type=_FRACTION, default=0.25, help=top_k_help)
    p.add_argument("--steps", type=_COUNT, default=8, help=steps_help)


def _add_device_options(p: argparse.ArgumentParser) -> None:
    """--device and --precision of the commands that load a CELL-E (eval.load.PRECISIONS)."""
    p.add_argument("--device", type=_device, default=None, help="torch device; None: cuda if available, else cpu")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "int8"),
        default="fp32",
        help="transformer weights: fp32 (as trained), bf16 or int8 (faster; see benchmarks/celle_speed.py)",
    )
    p.add_argument(
        "--embedder-path",
        default=None,
        help="ESM-2 / TAPE weights, when they moved since training (default: the path recorded in the checkpoint)",
    )


def _cmd_predict(args: argparse.Namespace) -> int:
    from protloc.commands.predict import run_predict
    from protloc.errors import InputError

    if args.name is not None and args.fasta is not None:
        raise InputError("--name names a --sequence; FASTA record ids name the outputs of --fasta")
    sequences = {args.name or "query": args.sequence} if args.sequence is not None else None
    summary = run_predict(
        checkpoint=_checkpoint(args.checkpoint, "celle-tiny"),
        out=args.out,
        sequences=sequences,
        fasta=args.fasta,
        nucleus=args.nucleus,
        sampling=_sampling(args, seed=args.seed, samples=args.samples),
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        embedder_path=args.embedder_path,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    _print_table(
        "predict",
        {
            "checkpoint": f"{summary['checkpoint']} (step {summary['step']})",
            "nucleus": summary["nucleus"]["source"],
            "sequences": len(summary["sequences"]),
            "seconds": summary["seconds"],
        },
    )
    for r in summary["sequences"]:
        print(
            f"  {r['name']}: nucleus proportion {r['nucleus_proportion']:.3f} (probability map), "
            f"{r['threshold_nucleus_proportion']:.3f} (threshold image)"
        )
    print(f"predictions written to {args.out}")
    return 0


def _add_predict(subparsers) -> None:
    p = _sub(
        subparsers,
        "predict",
        help="CELL-E: a protein's localization image from its sequence and a nucleus image",
        description=(
            "Sample protein-threshold images with a trained CELL-E (`protloc train celle`) for amino-acid "
            "sequences, each conditioned on one nucleus image (paper Sec. 4.6: top 25% of the codes, Gumbel "
            "sampling at a temperature, seeded), and decode the 2D probability density map of Eq. 3. Sequences "
            "longer than the model's window use their N-terminal residues.\n\n"
            "--nucleus: a 2-D grey TIFF/PNG/NPY image at least the model's image size on each side; its centred "
            "square is min-max scaled to [0, 1] and area-averaged to the model's size. Without it, a real "
            "nucleus shipped with the reference world is used (12 um across at 0.4 um/px, centred in a field "
            "as wide as the run's training crops).\n\n"
            "Writes to OUT, per sequence: NAME_threshold.png (predicted threshold image), NAME_probability.npy "
            "(float32 2D PDF, sums to 1), NAME_overlay.png (heatmap over the nucleus with its mask outline); "
            "and nucleus.png (the model's nucleus input) and summary.json (windows, end token, nucleus "
            "proportions of the map and of the threshold image, settings, checkpoint and step, timings)."
        ),
        example="""
        protloc predict --checkpoint runs/celle --sequence MKTAYIAKQRQISFVKSHFSRQ --name myprotein --out runs/predict
        protloc predict --checkpoint runs/celle --fasta queries.fasta --nucleus nucleus.tif --samples 4 \\
            --temperature 0.8 --seed 1 --out runs/predict_fasta
        """,
    )
    p.add_argument("--checkpoint", default=None, help=_CKPT_HELP.format(default="celle-tiny"))
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--sequence", default=None, help="one amino-acid sequence")
    what.add_argument("--fasta", type=Path, default=None, help="FASTA file of sequences (ids name the outputs)")
    p.add_argument("--name", default=None, help="name of the --sequence; None: query")
    p.add_argument("--nucleus", type=Path, default=None, help="2-D grey nucleus image; None: reference nucleus")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--samples", type=_COUNT, default=1, help="draws per sequence (threshold = pixel-wise majority)")
    _add_sampling_options(p)
    p.add_argument("--seed", type=_SEED, default=0, help="sampling seed (same seed + batch size: same outputs)")
    p.add_argument("--batch-size", type=_COUNT, default=8, help="sequences per generation batch")
    _add_device_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    p.set_defaults(func=_cmd_predict)


# ------------------------------------------------------------------------------------------ localize
def _cmd_localize(args: argparse.Namespace) -> int:
    from protloc.commands.localize import DEFAULT_CHECKPOINT, run_localize

    summary = run_localize(
        {"query": args.sequence} if args.sequence is not None else args.sequences,
        args.out,
        checkpoint=args.checkpoint or DEFAULT_CHECKPOINT,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        importance=not args.no_importance,
        ig_steps=args.ig_steps,
        device=args.device,
        progress=not args.quiet,
        precision=args.precision,
    )
    model = summary["model"]
    _print_table(
        "localize",
        {
            "model": f"{model['name']} (sha256 {model['sha256'][:12]})",
            "thresholds": summary["threshold_source"],
            "proteins": summary["proteins"],
            "clipped": summary["clipped"],
            "nuclear": summary["nuclear"],
            "seconds": summary["seconds"],
        },
    )
    rows = summary["sequences"]
    if len(rows) <= 20:
        tops = [", ".join(f"{c} {p:.2f}" for c, p in r["top_compartments"]) for r in rows]
        width, top_width = max(len(r["name"]) for r in rows + [{"name": "protein"}]), max(map(len, tops))
        print(f"  {'protein'.ljust(width)}  {'length':>6}  {'top compartments'.ljust(top_width)}  {'nucleus':>7}")
        for r, top in zip(rows, tops, strict=True):
            flag = "  nuclear" if r["nuclear"] else ""
            print(f"  {r['name'].ljust(width)}  {r['length']:>6}  {top.ljust(top_width)}  {r['p_nucleus']:>7.3f}{flag}")
    print(f"{len(rows)} protein(s) localized; results written to {args.out}")
    return 0


def _add_localize(subparsers) -> None:
    p = _sub(
        subparsers,
        "localize",
        help="protein encoder: where a protein goes from its sequence alone, and which residues say so",
        description=(
            "Predict the localization of proteins from their amino-acid sequence with the protein encoder "
            "(`protloc train encoder`; default: the shipped encoder-small): the presence probability of each of "
            "12 compartments and of the nucleus, calls at the thresholds chosen on validation proteins (0.5 when "
            "the checkpoint carries none), the distribution over compartments and the protein vector. Sequences "
            "longer than 1000 residues keep their first and last 500 (DeepLoc's rule) and are flagged.\n\n"
            "Unless --no-importance, each residue's importance for the nucleus output and for the protein's top "
            "compartment is computed by integrated gradients (baseline: every residue <mask>), with the 9-residue "
            "window of largest importance. It is the slow part (forward and backward passes over --ig-steps "
            "interpolated inputs: about 2 s for a 300-residue protein, 9 s for a 1000-residue one on 2 CPU cores with "
            "encoder-small); --no-importance skips it.\n\n"
            "Writes to OUT: localize.csv (one row per protein), localize.h5ad (AnnData; obsm X_encoder, presence, "
            "distribution), importance.csv (per residue), importance/NAME.png (the first 200 proteins) and "
            "summary.json."
        ),
        example="""
        protloc localize --sequence MSKGEELFTGVVPILVELDGDVNGHKFSVSGEGEGDATYGKLTLKFICTTGKLPVPWPTL --out runs/localize
        protloc localize --sequences proteins.fasta --out runs/localize_all --no-importance
        """,
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--sequence", default=None, help="one amino-acid sequence (named query)")
    what.add_argument(
        "--sequences", type=Path, default=None, help="FASTA file, or CSV/TSV table with protein_id and sequence"
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--checkpoint", default=None, help=_CKPT_HELP.format(default="encoder-small"))
    p.add_argument("--batch-size", type=_COUNT, default=32, help="sequences per forward pass")
    p.add_argument("--no-importance", action="store_true", help="skip the per-residue importance (faster)")
    p.add_argument("--ig-steps", type=_COUNT, default=32, help="integrated-gradients interpolation steps")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: bfloat16 autocast for the probabilities (faster on CPUs with AVX512-BF16)",
    )
    p.add_argument("--device", type=_device, default="cpu", help="torch device")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    p.set_defaults(func=_cmd_localize)


# ---------------------------------------------------------------------------------------------- fill
def _cmd_fill(args: argparse.Namespace) -> int:
    from protloc.commands.fill import run_fill
    from protloc.errors import InputError

    if args.name is not None and args.fasta is not None:
        raise InputError("--name names a --sequence; FASTA record ids name the outputs of --fasta")
    sequences = {args.name or "query": args.sequence} if args.sequence is not None else None
    summary = run_fill(
        checkpoint=_checkpoint(args.checkpoint, None),
        out=args.out,
        threshold=args.threshold,
        sequences=sequences,
        fasta=args.fasta,
        nucleus=args.nucleus,
        sampling=_sampling(args, seed=args.seed, samples=args.samples),
        device=args.device,
        precision=args.precision,
        embedder_path=args.embedder_path,
        overwrite=args.overwrite,
    )
    _print_table(
        "fill",
        {
            "checkpoint": f"{summary['checkpoint']} (step {summary['step']})",
            "threshold": summary["threshold"]["source"],
            "sequences": len(summary["sequences"]),
            "seconds": summary["seconds"],
        },
    )
    for r in summary["sequences"]:
        print(f"  {r['name']}: {r['masked']} residue(s) filled, mean probability {r['mean_probability']:.3f}")
        for k, seq in enumerate(r["filled"][:3]):
            print(f"    sample {k + 1}: {seq}")
    print(f"filled sequences written to {args.out}")
    return 0


def _add_fill(subparsers) -> None:
    p = _sub(
        subparsers,
        "fill",
        help="CELL-E 2 image to sequence: fill masked residues from a nucleus and a threshold image",
        description=(
            "Fill the residues marked '_' in a sequence from a nucleus image and a protein-threshold image with a "
            "masked-mode CELL-E trained to predict masked residues (`protloc train celle --set model.mode=masked "
            "'model.masked_segments=[threshold,text]'`, a per-residue embedder such as onehot). All masked "
            "positions are filled in --steps passes (most confident first, cosine schedule), not one pass per "
            "residue.\n\n"
            "--threshold: a 2-D image of the protein's localization (e.g. a NAME_threshold.png of `protloc "
            "predict`); its centred square is scaled by its maximum, area-averaged to the model's size and "
            "binarised at 0.5. --nucleus as in `protloc predict` (default: the reference nucleus).\n\n"
            "Writes to OUT: filled.fasta, residues.csv (per filled position and sample: residue, its "
            "probability, the pass that chose it, and every residue's probability), residues_NAME.png, "
            "nucleus.png, threshold.png and summary.json."
        ),
        example="""
        protloc fill --checkpoint runs/celle_masked --sequence MKT____AKQRQISFVKSHFSRQ --threshold thr.png \\
            --out runs/fill
        protloc fill --checkpoint runs/celle_masked --fasta masked.fasta --threshold thr.png --nucleus nucleus.tif \\
            --samples 4 --steps 4 --out runs/fill_fasta
        """,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="masked-mode CELL-E trained with text masked: run folder (uses best/) or checkpoint folder",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--sequence", default=None, help="one sequence with '_' at the residues to fill")
    what.add_argument("--fasta", type=Path, default=None, help="FASTA file of sequences with '_' (ids name them)")
    p.add_argument("--name", default=None, help="name of the --sequence; None: query")
    p.add_argument("--threshold", required=True, type=Path, help="2-D protein-threshold image")
    p.add_argument("--nucleus", type=Path, default=None, help="2-D grey nucleus image; None: reference nucleus")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--samples", type=_COUNT, default=1, help="fills per sequence")
    _add_sampling_options(
        p, top_k_help="share of the 20 residues kept before sampling", steps_help="passes over all masked positions"
    )
    p.add_argument("--seed", type=_SEED, default=0, help="sampling seed")
    _add_device_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    p.set_defaults(func=_cmd_fill)


# -------------------------------------------------------------------------------------------- screen
_SCREEN_OPTIONS = {  # option -> (argparse dest, the mode it belongs to)
    "--at": ("at", "insert"),
    "--from": ("from_", "truncate"),
    "--min-length": ("min_length", "truncate"),
    "--step": ("step", "delete"),
    "--positions": ("positions", "mutate"),
    "--method": ("method", "attention"),
}


def _parse_peptides(values: Sequence[str]) -> dict[str, str]:
    from protloc.errors import InputError

    peptides: dict[str, str] = {}
    for value in values:
        name, sep, peptide = value.partition("=")
        name, peptide = (name.strip(), peptide.strip()) if sep else (value.strip(), value.strip())
        if not name or not peptide:
            raise InputError(f"--insert takes NAME=PEPTIDE (e.g. NLS=PKKKRKV), got {value!r}")
        if name in peptides:
            raise InputError(f"--insert names peptide {name!r} twice")
        peptides[name] = peptide
    return peptides


def _parse_at(values: Sequence[str]) -> list[int | str]:
    from protloc.errors import InputError

    out: list[int | str] = []
    for value in values:
        v = value.strip().lower()
        if v in ("start", "end"):
            out.append(v)
            continue
        try:
            i = int(v)
        except ValueError:
            i = -1
        if i < 0:
            raise InputError(f"--at takes start, end or a residue count >= 0 (insert after it), got {value!r}")
        out.append(i)
    return out


def _parse_positions(spec: str) -> list[int]:
    """``"1-50,60,70-72"`` (1-based, inclusive) -> 0-based positions, in order, without repeats."""
    from protloc.errors import InputError

    out: list[int] = []
    for part in spec.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            a = b = 0
        if a < 1 or b < a:
            raise InputError(f"--positions takes 1-based residues or ranges like 1-50,60 (got {spec!r})")
        out.extend(range(a - 1, b))
    return list(dict.fromkeys(out))


def _cmd_screen(args: argparse.Namespace) -> int:
    from protloc.commands.screen import run_screen
    from protloc.errors import InputError

    given = {
        "insert": args.insert is not None,
        "truncate": args.truncate is not None,
        "delete": args.delete is not None,
        "mutate": args.mutate is not None,
        "attention": args.attention,
    }
    modes = [m for m, on in given.items() if on]
    if len(modes) != 1:
        flags = "--insert, --truncate, --delete, --mutate or --attention"
        raise InputError(f"give exactly one screen: {flags}" + (f" (got --{' and --'.join(modes)})" if modes else ""))
    mode = modes[0]
    for option, (dest, owner) in _SCREEN_OPTIONS.items():
        if getattr(args, dest) is not None and owner != mode:
            raise InputError(f"{option} applies to --{owner}, not --{mode}")
    kwargs: dict = {}
    if mode == "insert":
        kwargs = {"peptides": _parse_peptides(args.insert), "at": _parse_at(args.at or ["end"])}
    elif mode == "truncate":
        min_length = 1 if args.min_length is None else args.min_length
        kwargs = {"step": args.truncate, "from_": args.from_ or "n", "min_length": min_length}
    elif mode == "delete":
        kwargs = {"window": args.delete, "step": args.step}
    elif mode == "mutate":
        positions = None if args.positions is None else _parse_positions(args.positions)
        kwargs = {"residues": args.mutate, "positions": positions}
    else:
        kwargs = {"method": args.method or "rollout"}
    summary = run_screen(
        checkpoint=_checkpoint(args.checkpoint, "celle-tiny"),
        out=args.out,
        mode=mode,
        sequence=args.sequence,
        name=args.name,
        fasta=args.fasta,
        record_id=args.id,
        nucleus=args.nucleus,
        sampling=_sampling(args, seed=args.seed, samples=args.samples),
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        embedder_path=args.embedder_path,
        overwrite=args.overwrite,
        progress=not args.quiet,
        **kwargs,
    )
    seq = summary["sequence"]
    table = {
        "checkpoint": f"{summary['checkpoint']} (step {summary['step']})",
        "sequence": f"{seq['name']} ({seq['length']} residues, model window {summary['model_window']})",
        "nucleus": summary["nucleus"]["source"],
    }
    if mode == "attention":
        table.update(
            {
                "patches": f"{summary['n_present']} present, {summary['n_background']} background",
                "seconds": summary["seconds"],
            }
        )
        _print_table("screen (attention)", table)
        for r in summary["top_residues"]:
            print(f"  {r['residue']}{r['position']}: present - background {_fmt(r['difference'])}")
    else:
        table.update(
            {
                "variants": summary["variants"],
                "wild type": f"nucleus proportion {_fmt(summary['wild_type_nucleus_proportion'])}",
                "seconds": summary["seconds"],
            }
        )
        _print_table(f"screen ({mode})", table)
        for r in summary["top_variants"]:
            print(f"  {r['name']}: nucleus proportion {_fmt(r['nucleus_proportion'])} (delta {r['delta']:+.3f})")
    for w in summary["warnings"]:
        print(f"warning: {w}")
    print(f"screen written to {args.out}")
    return 0


def _add_screen(subparsers) -> None:
    p = _sub(
        subparsers,
        "screen",
        help="CELL-E in-silico screens: insertions, truncations, deletions, substitutions, residue attention",
        description=(
            "Predict variants of one protein with a trained CELL-E (`protloc train celle`), all against the same "
            "nucleus image and with the same sampling noise (common random numbers), and tabulate each "
            "variant's nucleus proportion (S.3.7) and its change from the wild type (paper Sec. 2.3: GFP and "
            "GFP + NLS insertions, Fig. 4; the TOP1 N-terminal truncation series, Fig. 5). One screen per call:\n"
            "  --insert NAME=PEPTIDE (repeatable) at --at start | end | N (after N residues; repeatable)\n"
            "  --truncate STEP: remove 1, 2, ... x STEP residues from --from n|c, keeping --min-length\n"
            "  --delete WINDOW: internal deletions of WINDOW residues sliding by --step (default WINDOW)\n"
            "  --mutate A|all: substitutions to these residues at --positions (1-based, e.g. 1-50,60; "
            "default all)\n"
            "  --attention: attention of protein-present vs background threshold patches to each residue "
            "(S.3.8, Fig. 6; --method rollout or mean), from one generated image\n\n"
            "The wild type: --sequence (named --name), a --fasta record (--id; optional for a one-record file), "
            "or --id alone for an engineered construct shipped with the reference world (GFP, "
            "GFP_NLS_nucleoplasmin, GFP_NLS_NMyc, GFP_random_peptide, TOP1, GFP_TOP1_1-199, ...). --nucleus as "
            "in `protloc predict` (default: the reference nucleus).\n\n"
            "Writes to OUT: screen.csv (name, kind, position (0-based), length, detail, nucleus_proportion, sd, "
            "delta, input_changed; wild type first), screen.png and summary.json (mode, settings, wild-type "
            "nucleus proportion, the 5 largest |delta|, checkpoint, seconds, warnings: variants that change "
            "only residues beyond the model's N-terminal window see the wild type's input). With --attention: "
            "attention.csv (residue, position, present, background, difference), attention.png, summary.json."
        ),
        example="""
        protloc screen --checkpoint runs/celle --sequence MSKGEELFTGVVPILVELDGDVNGHKFSVSGEGEG --insert NLS=PKKKRKV \\
            --at end --out runs/screen_nls
        protloc screen --checkpoint runs/celle --id GFP --insert nucleoplasmin=KRPAATKKAGQAKKKK \\
            --insert N-Myc=PAAKRVKLD --at start --at end --samples 4 --out runs/screen_gfp
        protloc screen --checkpoint runs/celle --id TOP1 --truncate 25 --from n --min-length 100 --out runs/screen_top1
        protloc screen --checkpoint runs/celle --fasta queries.fasta --id P3 --delete 5 --step 2 --out runs/screen_del
        protloc screen --checkpoint runs/celle --id GFP_NLS_NMyc --mutate A --positions 239-247 --out runs/screen_ala
        protloc screen --checkpoint runs/celle --id GFP_NLS_nucleoplasmin --attention --method rollout \\
            --out runs/screen_attention
        """,
    )
    p.add_argument("--checkpoint", default=None, help=_CKPT_HELP.format(default="celle-tiny"))
    p.add_argument("--sequence", default=None, help="the wild-type amino-acid sequence")
    p.add_argument("--name", default=None, help="name of the --sequence; None: query")
    p.add_argument("--fasta", type=Path, default=None, help="FASTA file holding the wild type (pick it with --id)")
    p.add_argument("--id", default=None, help="FASTA record id; without --fasta: an engineered construct")
    p.add_argument("--nucleus", type=Path, default=None, help="2-D grey nucleus image; None: reference nucleus")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    kind = p.add_argument_group("screens (exactly one)")
    kind.add_argument(
        "--insert", action="append", default=None, metavar="NAME=PEPTIDE", help="peptide to insert (repeatable)"
    )
    kind.add_argument(
        "--at",
        action="append",
        default=None,
        metavar="start|end|N",
        help="insertion point: start, end or after N residues (repeatable); None: end",
    )
    kind.add_argument("--truncate", type=_COUNT, default=None, metavar="STEP", help="truncation series step (residues)")
    kind.add_argument("--from", dest="from_", choices=["n", "c"], default=None, help="terminus truncated; None: n")
    kind.add_argument("--min-length", type=_COUNT, default=None, help="shortest truncation kept; None: 1")
    kind.add_argument("--delete", type=_COUNT, default=None, metavar="WINDOW", help="deletion scan window (residues)")
    kind.add_argument("--step", type=_COUNT, default=None, help="deletion window slide; None: WINDOW")
    kind.add_argument("--mutate", default=None, metavar="A|all", help="target residue(s) of a mutational scan")
    kind.add_argument(
        "--positions",
        default=None,
        metavar="1-50",
        help="residues to mutate (1-based ranges, comma-separated); None: all",
    )
    kind.add_argument("--attention", action="store_true", help="residue attention, present vs background (S.3.8)")
    kind.add_argument(
        "--method", choices=["rollout", "mean"], default=None, help="attention over layers; None: rollout"
    )
    p.add_argument("--samples", type=_COUNT, default=1, help="draws per variant (mean and sd of the proportion)")
    _add_sampling_options(p)
    p.add_argument("--seed", type=_SEED, default=0, help="sampling seed (shared by all variants)")
    p.add_argument("--batch-size", type=_COUNT, default=8, help="variants per generation batch (same results)")
    _add_device_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    p.set_defaults(func=_cmd_screen)


# ------------------------------------------------------------------------------------------ evaluate
def _cmd_evaluate(args: argparse.Namespace) -> int:
    from protloc.commands.evaluate import run_evaluate

    if args.checkpoint:
        checkpoints = [_checkpoint(c, None) for c in args.checkpoint]
    else:
        checkpoints = [_checkpoint(None, "celle-tiny")]
    summary = run_evaluate(
        checkpoints=checkpoints,
        names=args.name,
        store=args.store,
        out=args.out,
        sequences=args.sequences,
        split=None if args.split == "all" else args.split,
        max_crops=args.max_crops,
        seed=args.seed,
        augment=not args.no_augment,
        ceiling=not args.no_ceiling,
        baseline=not args.no_baseline,
        train_split=args.train_split,
        batch_size=args.batch_size,
        sampling=_sampling(args, seed=args.sampling_seed),
        device=args.device,
        precision=args.precision,
        embedder_path=args.embedder_path,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    crops = next(iter(summary["models"].values()))["images"]
    print(f"mean +- sd over proteins ({crops} crops of split {args.split}, seed {args.seed}):")
    print(summary["table"], end="")
    print(f"evaluation written to {args.out} in {summary['seconds']:.1f} s")
    return 0


def _add_evaluate(subparsers) -> None:
    p = _sub(
        subparsers,
        "evaluate",
        help="CELL-E image accuracy on a split vs the VQGAN ceiling and a sequence baseline (Tables S.1-S.2)",
        description=(
            "Score trained CELL-E models (`protloc train celle`) on the crops of one split of the CELL-E crop store, "
            "as in paper S.3.7: one prediction per image (one sampled set of threshold tokens, decoded, plus the "
            "2D PDF of Eq. 3), each image randomly cropped and flipped as in training, with the crops and flips "
            "shared across models (a hash of --seed and the crop index). Metrics per image: nucleus proportion "
            "accuracy, predicted threshold pixel accuracy, predicted 2D PDF pixel accuracy, SSIM, nuclear "
            "localization accuracy. Reference rows on the same crops: the VQGAN ceiling (the target threshold "
            "image through the first model's threshold tokenizer) and a sequence-only baseline (ridge regression "
            "of the nucleus proportion on amino-acid + dipeptide composition, fitted on --train-split); "
            "--no-ceiling / --no-baseline leave them out.\n\n"
            "Writes to OUT: metrics.json (per row, metric -> [mean, sd] over proteins and over images, settings, "
            "timings), table.md (markdown tables over proteins and over images), per_image.csv and per_protein.csv "
            "(with a model column). Prints the table over proteins."
        ),
        example="""
        protloc evaluate --checkpoint runs/celle --store runs/demo/prepared/celle.zarr --out runs/evaluate
        protloc evaluate --checkpoint runs/celle --checkpoint runs/celle_masked --name CELL-E --name "CELL-E 2" \\
            --store prep/celle.zarr --split test --max-crops 500 --seed 1 --out runs/evaluate_test
        """,
    )
    p.add_argument(
        "--checkpoint",
        action="append",
        default=None,
        help="CELL-E run folder (uses best/), checkpoint folder or pretrained:NAME (repeatable); "
        "default: the shipped celle-tiny",
    )
    p.add_argument(
        "--name",
        action="append",
        default=None,
        help="row name of each --checkpoint, in order (default: CELL-E, or the folder names)",
    )
    p.add_argument("--store", required=True, type=Path, help="CELL-E crop store (OUT/celle.zarr of protloc prepare)")
    p.add_argument("--sequences", type=Path, default=None, help="FASTA or table (default: beside the store)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--split", default="val", help="split to evaluate, or 'all'")
    p.add_argument("--train-split", default="train", help="split the sequence baseline is fitted on")
    p.add_argument("--max-crops", type=_COUNT, default=None, help="at most this many crops (seeded subsample)")
    p.add_argument("--seed", type=_SEED, default=0, help="seed of the crops, flips and subsample")
    p.add_argument("--no-augment", action="store_true", help="centre crops without flips")
    p.add_argument("--no-ceiling", action="store_true", help="leave out the VQGAN-ceiling row")
    p.add_argument("--no-baseline", action="store_true", help="leave out the sequence-baseline row")
    p.add_argument("--batch-size", type=_COUNT, default=8, help="crops per forward pass")
    _add_sampling_options(p)
    p.add_argument("--sampling-seed", type=_SEED, default=0, help="seed of the token sampling (shared by all models)")
    _add_device_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    p.set_defaults(func=_cmd_evaluate)


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "n/a" if f != f else f"{f:.3f}"


# ------------------------------------------------------------------------------------------- helpers
_CKPT_HELP = (
    "run folder (uses best/), checkpoint folder, or pretrained:NAME (see `protloc weights`); default: the shipped "
    "{default}"
)


def _sampling(args: argparse.Namespace, *, seed: int, samples: int = 1):
    """The SamplingConfig of --temperature, --top-k-fraction, --steps (_add_sampling_options), a seed and samples."""
    from protloc.eval.predict import SamplingConfig

    return SamplingConfig(
        temperature=args.temperature, top_k_fraction=args.top_k_fraction, steps=args.steps, seed=seed, samples=samples
    )


def _checkpoint(value: str | None, default: str | None) -> Path:
    from protloc.pretrained import resolve_checkpoint

    return resolve_checkpoint(value, default=default)


def _print_table(title: str, summary: dict) -> None:
    width = max((len(str(k)) for k in summary), default=0)
    print(f"== {title} ==")
    for k, v in summary.items():
        print(f"  {str(k).ljust(width)}  {v}")


def build_parser() -> argparse.ArgumentParser:
    """Return the ``protloc`` argument parser."""
    parser = _Parser(
        prog="protloc",
        description="Predict and profile where proteins live inside human cells (cytoself, CELL-E).",
        formatter_class=_Formatter,
        epilog="example:\n  protloc world make --out runs/world && protloc prepare --fovs runs/world/fovs.csv "
        "--sequences runs/world/sequences.fasta --out runs/prepared",
    )
    parser.add_argument("--version", action="version", version=f"protloc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo(sub)
    _add_weights(sub)
    _add_world(sub)
    _add_prepare(sub)
    _add_import(sub)
    _add_train(sub)
    _add_embed(sub)
    _add_atlas(sub)
    _add_spectrum(sub)
    _add_interpret(sub)
    _add_predict(sub)
    _add_localize(sub)
    _add_fill(sub)
    _add_screen(sub)
    _add_evaluate(sub)
    _state_ranges(parser)
    return parser


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    root = logging.getLogger("protloc")
    root.setLevel(level)
    for h in root.handlers:
        if getattr(h, "_protloc", False):
            # main() may run many times in one process (tests, notebooks): write to today's stderr
            # (not setStream: it flushes the old stream, which may be closed by now)
            h.stream = sys.stderr  # type: ignore[attr-defined]
            break
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._protloc = True  # type: ignore[attr-defined]
        root.addHandler(handler)


def _after_interrupt(args: argparse.Namespace) -> str:
    """What to do after an interruption, for this command (advice that works when followed)."""
    out = getattr(args, "out", None)
    if args.command == "train" and out is not None:
        if (Path(out) / "last" / "trainer_state.pt").is_file():
            return f"continue the run with the same command and --resume (it restarts from {Path(out) / 'last'})"
        return "no checkpoint was saved yet: run the same command again (without --resume)"
    if args.command in ("prepare", "embed"):
        return "run the same command again: it continues where it stopped (finished work is kept in OUT.partial)"
    if args.command == "demo":
        return "run the same command again: finished stages are reused"
    return "run the same command again"


#: errno values of a file system that refuses a write (reported in one line by main, not as a traceback).
_FILESYSTEM_ERRORS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ENAMETOOLONG,
}


def _final_name(path: str | os.PathLike) -> str:
    """The path a user knows: temporary siblings of atomic writes (``.NAME.xxxx.tmp``) named as NAME."""
    parts = [re.sub(r"^\.(.+)\.[A-Za-z0-9_]+\.tmp$", r"\1", part) for part in Path(os.fspath(path)).parts]
    return str(Path(*parts)) if parts else str(path)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (what ``kill``, ``timeout`` and batch schedulers send), handled like Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``protloc`` command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    # the global flags (-q, -v, --debug) go before the subcommand: the subcommands do not accept them
    _configure_logging(args.verbose, args.quiet)
    if getattr(args, "_proteins_zero_is_all", False) and getattr(args, "proteins", None) == 0:
        args.proteins = None
    # SIGTERM becomes an exception like Ctrl-C's, so every atomic write removes its temporaries on the way out.
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        return int(args.func(args) or 0)
    except ProtlocError as exc:
        if args.debug:
            raise
        print(f"protloc: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # The file system refused a write (full disk, read-only or unwritable folder, a file where a folder
        # should be): say which file and why in one line. Atomic writes have removed their temporaries.
        if args.debug or exc.errno not in _FILESYSTEM_ERRORS:
            raise
        where = f"{_final_name(exc.filename)}: " if exc.filename else ""
        print(f"protloc: error: {where}cannot write: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        what = "terminated (SIGTERM)" if isinstance(exc, _Terminated) else "interrupted"
        print(
            f"protloc: {what}. Outputs are written atomically, so nothing half-written was kept; "
            f"{_after_interrupt(args)}.",
            file=sys.stderr,
        )
        return 143 if isinstance(exc, _Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        release_outputs()  # locks of outputs a failed command never reached (protloc._fs.check_out)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
