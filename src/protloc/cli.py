"""The ``protloc`` command line.

``main(argv)`` is callable from tests and returns the exit code. User errors (any
:class:`protloc.errors.ProtlocError`) print one line and exit with status 2; ``--debug`` shows the
traceback. Logging handlers are configured here and nowhere else.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

from protloc import __version__
from protloc.errors import ProtlocError

logger = logging.getLogger("protloc.cli")


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the example blocks as written and show defaults."""


def _sub(subparsers, name: str, *, help: str, description: str, example: str) -> argparse.ArgumentParser:
    epilog = "example:\n" + textwrap.indent(textwrap.dedent(example).strip(), "  ")
    return subparsers.add_parser(
        name, help=help, description=description, epilog=epilog, formatter_class=_Formatter
    )


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
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    meta = json.loads((Path(out) / "world.json").read_text())
    counts = meta.get("counts", {})
    print(f"world written to {out} in {time.perf_counter() - t0:.1f} s: " + ", ".join(
        f"{k}={v}" for k, v in counts.items()
    ))
    return 0


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
            "human proteins with GO-derived localization (mode 'real') or for synthetic sequences whose "
            "localization follows planted sequence signals (mode 'synthetic'), plus per-protein truth."
        ),
        example="protloc world make --out runs/world --proteins 100 --fovs 4 --seed 0",
    )
    m.add_argument("--out", required=True, type=Path, help="output folder")
    m.add_argument("--proteins", type=int, default=100, help="number of proteins (0 = all shipped ones)")
    m.add_argument("--fovs", type=int, default=4, help="fields of view per protein")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--size", type=int, default=512, help="field-of-view side in pixels (~0.4 um/pixel)")
    m.add_argument("--mode", choices=["real", "synthetic"], default="real")
    m.add_argument("--z", type=int, default=1, help="z-slices per field (>1 writes *_stack.tif z-stacks)")
    m.add_argument("--no-engineered", action="store_true", help="leave out the engineered GFP/NLS constructs")
    m.add_argument("--workers", type=int, default=1, help="worker processes")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    m.set_defaults(func=_cmd_world_make, _proteins_zero_is_all=True)


# ------------------------------------------------------------------------------------------- prepare
def _cmd_prepare(args: argparse.Namespace) -> int:
    from protloc.config import load_config
    from protloc.data.prepare import PrepareConfig, prepare

    cfg = load_config(PrepareConfig, path=args.config, overrides=args.set or [])
    summary = prepare(
        args.fovs,
        args.out,
        config=cfg,
        sequences=args.sequences,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.quiet,
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
        protloc prepare --fovs fovs.csv --out prep --set celle.split_by=homology --set celle.identity=0.4
        """,
    )
    p.add_argument("--fovs", required=True, type=Path, help="field-of-view table (CSV/TSV)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--sequences", type=Path, default=None, help="FASTA of protein sequences (ids = protein_id)")
    p.add_argument("--config", type=Path, default=None, help="YAML file with PrepareConfig keys")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. params.sigma=1.5")
    p.add_argument("--workers", type=int, default=1, help="worker processes over fields of view")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_cmd_prepare)


# ---------------------------------------------------------------------------------------------- demo
def _cmd_demo(args: argparse.Namespace) -> int:
    from protloc.data.prepare import PrepareConfig, prepare
    from protloc.data.world.make import make_world

    out = Path(args.out)
    world = out / "world"
    t0 = time.perf_counter()
    if (world / "world.json").is_file() and not args.fresh:
        logger.info("reusing the reference world in %s (pass --fresh to rebuild)", world)
    else:
        make_world(
            world,
            proteins=args.proteins,
            fovs=args.fovs,
            seed=args.seed,
            size=512,
            mode="real",
            workers=args.workers,
            overwrite=True,
            progress=not args.quiet,
        )
    t_world = time.perf_counter() - t0
    summary = prepare(
        world / "fovs.csv",
        out / "prepared",
        config=PrepareConfig(),
        sequences=world / "sequences.fasta",
        workers=args.workers,
        overwrite=True,
        progress=not args.quiet,
    )
    summary = {"world_seconds": round(t_world, 1), **summary}
    _print_table("demo", summary)
    print(f"outputs in {out}")
    return 0


def _add_demo(subparsers) -> None:
    p = _sub(
        subparsers,
        "demo",
        help="the main job on the embedded reference world",
        description="Build the reference world and prepare its crops (what `make demo` runs).",
        example="protloc demo --out runs/demo",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--proteins", type=int, default=100)
    p.add_argument("--fovs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--fresh", action="store_true", help="rebuild the world even if it exists")
    p.set_defaults(func=_cmd_demo)


# ------------------------------------------------------------------------------------------- helpers
def _print_table(title: str, summary: dict) -> None:
    width = max((len(str(k)) for k in summary), default=0)
    print(f"== {title} ==")
    for k, v in summary.items():
        print(f"  {str(k).ljust(width)}  {v}")


def build_parser() -> argparse.ArgumentParser:
    """Return the ``protloc`` argument parser."""
    parser = argparse.ArgumentParser(
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
    _add_world(sub)
    _add_prepare(sub)
    return parser


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    root = logging.getLogger("protloc")
    root.setLevel(level)
    if not any(getattr(h, "_protloc", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._protloc = True  # type: ignore[attr-defined]
        root.addHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``protloc`` command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    # global flags may also appear after the subcommand
    _configure_logging(args.verbose, args.quiet)
    if getattr(args, "_proteins_zero_is_all", False) and getattr(args, "proteins", None) == 0:
        args.proteins = None
    try:
        return int(args.func(args) or 0)
    except ProtlocError as exc:
        if args.debug:
            raise
        print(f"protloc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("protloc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
