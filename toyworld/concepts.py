"""Novel concepts for personalization: object instances the pretraining world never shows.

A concept is one ``(shape, colour, pattern, pattern_colour)`` combination. Each part occurs in
pretraining on other objects (the shape in other colours and patterns, both colours as main and
pattern colours, the pattern on other shapes), so fine-tuning cross-attention only has to bind a
new token to a new *combination*. The pretraining sampler never draws these combinations (nor the
mirrored twotone ones), see :data:`EXCLUDED_COMBOS`.

A concept's training images are a few "photos" of the same instance with slightly varying size,
position and background, captioned with the class word only ("a photo of a triangle"), like the
photos of one's dog in DreamBooth/Custom Diffusion.

CLI::

    python -m toyworld.concepts --list
    python -m toyworld.concepts --name dotted_triangle --out DIR [--n 6] [--size 32]

writes ``DIR/images/000.png ...``, ``DIR/images.txt`` (absolute image paths, one per line) and
``DIR/caption.txt`` (one caption per image): the Custom Diffusion reference layout.
"""

from __future__ import annotations

import argparse
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from toyworld.captions import object_phrase, with_article
from toyworld.world import (
    COLOURS,
    LOW_CONTRAST,
    SHAPE_PATTERNS,
    SHAPES,
    TWO_COLOUR_PATTERNS,
    ObjectSpec,
    render_scene,
    sample_background,
)

log = logging.getLogger(__name__)

Combo = tuple[str, str, str, str | None]  # (shape, colour, pattern, pattern_colour)


@dataclass(frozen=True)
class Concept:
    """A novel object instance; ``shape`` doubles as its class word."""

    name: str
    shape: str
    colour: str
    pattern: str
    pattern_colour: str | None

    @property
    def class_word(self) -> str:
        return self.shape

    @property
    def combo(self) -> Combo:
        return (self.shape, self.colour, self.pattern, self.pattern_colour)

    @property
    def caption(self) -> str:
        """Caption of the concept's training images: the class word only."""
        return f"a photo of {with_article(self.shape)}"

    @property
    def description(self) -> str:
        """Full toy-world phrase, e.g. "a purple triangle with orange dots"."""
        return object_phrase(self.object())

    def object(self, size: float = 0.6, position: tuple[float, float] = (0.5, 0.5)) -> ObjectSpec:
        """The concept placed in a scene."""
        return ObjectSpec(*self.combo, size=size, position=position)


CONCEPTS: dict[str, Concept] = {
    c.name: c
    for c in (
        Concept("dotted_triangle", "triangle", "purple", "dots", "orange"),
        Concept("striped_circle", "circle", "green", "stripes", "yellow"),
        Concept("twotone_square", "square", "blue", "twotone", "orange"),
        Concept("dotted_diamond", "diamond", "red", "dots", "yellow"),
        Concept("twotone_ring", "ring", "yellow", "twotone", "purple"),
        Concept("outlined_triangle", "triangle", "green", "outline", None),
    )
}


def _mirrored(combo: Combo) -> Combo:
    shape, colour, pattern, second = combo
    if pattern == "twotone" and second is not None:
        return (shape, second, pattern, colour)
    return combo


EXCLUDED_COMBOS: frozenset[Combo] = frozenset(
    {c.combo for c in CONCEPTS.values()} | {_mirrored(c.combo) for c in CONCEPTS.values()}
)


def is_valid_combo(combo: Combo) -> bool:
    """Whether the world can draw ``combo`` (shape/pattern fit, contrasting second colour)."""
    shape, colour, pattern, second = combo
    if shape not in SHAPES or colour not in COLOURS or pattern not in SHAPE_PATTERNS[shape]:
        return False
    if pattern not in TWO_COLOUR_PATTERNS:
        return second is None
    if second not in COLOURS or second == colour:
        return False
    return frozenset((colour, second)) not in LOW_CONTRAST


def near_misses(name: str) -> list[Combo]:
    """Drawable, non-excluded combos that differ from the concept in exactly one attribute."""
    shape, colour, pattern, second = CONCEPTS[name].combo
    out: list[Combo] = []
    out += [(s, colour, pattern, second) for s in SHAPES if s != shape]
    out += [(shape, c, pattern, second) for c in COLOURS if c != colour]
    for p in SHAPE_PATTERNS[shape]:
        if p == pattern:
            continue
        if p in TWO_COLOUR_PATTERNS and second is not None:
            out.append((shape, colour, p, second))
        elif p not in TWO_COLOUR_PATTERNS:
            out.append((shape, colour, p, None))
        else:  # concept has no second colour: try every one
            out += [(shape, colour, p, c) for c in COLOURS]
    if second is not None:
        out += [(shape, colour, pattern, c) for c in COLOURS if c != second]
    return [c for c in dict.fromkeys(out) if is_valid_combo(c) and c not in EXCLUDED_COMBOS]


def concept_objects(
    name: str, n: int = 6, seed: int = 0
) -> list[tuple[ObjectSpec, tuple[int, int, int]]]:
    """``n`` placements of the concept: ``(object, background)`` pairs, deterministic."""
    concept = CONCEPTS[name]
    rng = np.random.default_rng([zlib.crc32(name.encode()), seed])
    out = []
    for _ in range(n):
        size = float(rng.uniform(0.52, 0.7))
        lo, hi = size / 2 + 0.03, 1 - size / 2 - 0.03
        pos = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
        out.append((concept.object(size, pos), sample_background(rng)))
    return out


def concept_images(name: str, n: int = 6, size: int = 32, seed: int = 0) -> list[Image.Image]:
    """The concept's example "photos" (same instance, varying placement and background)."""
    return [render_scene([obj], size, bg) for obj, bg in concept_objects(name, n, seed)]


def write_image_folder(images: list[Image.Image], captions: list[str], out: str | Path) -> Path:
    """Write ``out/images/NNN.png``, ``out/images.txt`` and ``out/caption.txt``; returns ``out``."""
    if len(images) != len(captions):
        raise ValueError("one caption per image")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = (out / "images" / f"{i:03d}.png").resolve()
        img.save(path)
        paths.append(str(path))
    (out / "images.txt").write_text("\n".join(paths) + "\n")
    (out / "caption.txt").write_text("\n".join(captions) + "\n")
    return out


def export_concept(name: str, out: str | Path, n: int = 6, size: int = 32, seed: int = 0) -> Path:
    """Write a concept's example images and class-word captions in the reference layout."""
    concept = CONCEPTS[name]
    images = concept_images(name, n, size, seed)
    out = write_image_folder(images, [concept.caption] * n, out)
    log.info("wrote %d images of %s (%s) to %s", n, name, concept.description, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--list", action="store_true", help="list the concepts and exit")
    parser.add_argument("--name", choices=sorted(CONCEPTS))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.list:
        for c in CONCEPTS.values():
            print(f"{c.name}\tclass={c.class_word}\t{c.description}")
        return
    if args.name is None or args.out is None:
        parser.error("--name and --out are required (or --list)")
    out = export_concept(args.name, args.out, args.n, args.size, args.seed)
    print(out)


if __name__ == "__main__":
    main()
