"""Contact sheet of the toy world: random pretraining samples, then each concept's images.

CLI::

    python -m toyworld.preview --out /tmp/toyworld_grid.png [--rows 6] [--size 32] [--scale 4]

Each concept row shows its example images followed by a few near misses (greyed label-free).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from toyworld.concepts import CONCEPTS, concept_images, near_misses
from toyworld.dataset import make_example
from toyworld.world import ObjectSpec, render_scene

log = logging.getLogger(__name__)


def contact_sheet(
    rows: int = 6, cols: int = 10, size: int = 32, scale: int = 4, seed: int = 0
) -> tuple[Image.Image, list[str]]:
    """The sheet image and the captions of its pretraining samples (row-major)."""
    tiles: list[list[Image.Image]] = []
    captions: list[str] = []
    for r in range(rows):
        row = []
        for c in range(cols):
            ex = make_example(r * cols + c, seed, size)
            row.append(ex.image)
            captions.append(ex.caption)
        tiles.append(row)
    rng = np.random.default_rng(seed)
    for name in CONCEPTS:
        row = concept_images(name, 6, size)
        misses = near_misses(name)
        for k in rng.choice(len(misses), cols - len(row), replace=False):
            row.append(render_scene([ObjectSpec(*misses[k], size=0.6)], size))
        tiles.append(row)
    pad = 2
    cell = size * scale + pad
    sheet = Image.new("RGB", (cols * cell + pad, len(tiles) * cell + pad), (60, 60, 60))
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            big = tile.resize((size * scale, size * scale), Image.Resampling.NEAREST)
            sheet.paste(big, (pad + c * cell, pad + r * cell))
    return sheet, captions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/toyworld_grid.png"))
    parser.add_argument("--rows", type=int, default=6)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sheet, captions = contact_sheet(args.rows, 10, args.size, args.scale, args.seed)
    sheet.save(args.out)
    for i, text in enumerate(captions):
        print(f"{i // 10},{i % 10}: {text}")
    print(args.out)


if __name__ == "__main__":
    main()
