"""Known object names of the toy world: the stand-in for Cross Initialization's celebrity list.

``names.txt`` (shipped beside this module) lists every ``"{colour} {shape}"`` pair, one per line,
in ``COLOURS`` x ``SHAPES`` order; :func:`object_names` regenerates it from the vocabulary and a
test checks that the two agree.
"""

from __future__ import annotations

from pathlib import Path

from toyworld.world import COLOURS, SHAPES

NAMES_PATH: Path = Path(__file__).with_name("names.txt")


def object_names() -> list[str]:
    """All ``"{colour} {shape}"`` names, e.g. ``"red circle"``."""
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def load_names(path: str | Path = NAMES_PATH) -> list[str]:
    """Names from a one-per-line file (default: the shipped ``names.txt``)."""
    lines = Path(path).read_text().splitlines()
    return [line.strip() for line in lines if line.strip()]


if __name__ == "__main__":
    NAMES_PATH.write_text("\n".join(object_names()) + "\n")
