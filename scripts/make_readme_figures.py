"""Draw the README figures from the reference world.

Run: ``.venv/bin/python scripts/make_readme_figures.py [--out docs/images] [--seed 0]``

- ``compartments.png``: one example crop per compartment of the reference cell world (nucleus in
  grey, protein in green), rendered with pure compartment weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from protloc.data.world.make import render_compartment_gallery
from protloc.plotting import crop_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="crop side in pixels (~0.4 um/pixel)")
    args = parser.parse_args()
    gallery = render_compartment_gallery(seed=args.seed, size=args.size)
    fig = crop_grid(list(gallery.values()), titles=list(gallery), ncols=6, panel_size=1.9)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "compartments.png"
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
