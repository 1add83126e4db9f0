"""The pretraining distribution: random scenes of 1, 2 or 3-4 objects.

Scene kinds:

- ``one``: a single object, size 0.30-0.65 of the image (patterned objects at least 0.42).
- ``two``: two objects with distinct (colour, shape), size 0.24-0.42 (patterned 0.36-0.44).
- ``many``: 3-4 plain objects with distinct (colour, shape), size 0.20-0.30; too small for
  patterns to be legible at 32 px.

Objects never overlap (their bounding discs keep a small gap) and stay inside the frame. The
concept combinations of :data:`toyworld.concepts.EXCLUDED_COMBOS` are never drawn unless a caller
passes a different ``exclude`` set.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np

from toyworld.concepts import EXCLUDED_COMBOS, Combo, is_valid_combo
from toyworld.world import (
    COLOURS,
    SHAPE_PATTERNS,
    SHAPES,
    TWO_COLOUR_PATTERNS,
    ObjectSpec,
    Scene,
    sample_background,
)

SCENE_KINDS: tuple[str, ...] = ("one", "two", "many")
DEFAULT_MIX: dict[str, float] = {"one": 0.4, "two": 0.4, "many": 0.2}

# (min, max) diameter, as a fraction of the image side, for plain and patterned objects.
SIZE_RANGES: dict[str, tuple[float, float]] = {
    "one": (0.30, 0.65),
    "two": (0.24, 0.42),
    "many": (0.20, 0.30),
}
# "many" is only used by explicit specs (toyworld.dataset.build_objects); the sampler keeps
# 3-4 object scenes plain.
PATTERNED_SIZE_RANGES: dict[str, tuple[float, float]] = {
    "one": (0.42, 0.70),
    "two": (0.36, 0.44),
    "many": (0.30, 0.34),
}
_MARGIN = 0.03  # gap to the frame and between objects' bounding discs


def choose_kind(rng: np.random.Generator, mix: Mapping[str, float] | None = None) -> str:
    """Pick a scene kind with probabilities ``mix`` (normalised)."""
    mix = DEFAULT_MIX if mix is None else mix
    kinds = [k for k in SCENE_KINDS if mix.get(k, 0.0) > 0]
    if not kinds or set(mix) - set(SCENE_KINDS):
        raise ValueError(f"mix must weight some of {SCENE_KINDS}, got {dict(mix)}")
    p = np.array([mix[k] for k in kinds], dtype=float)
    return kinds[int(rng.choice(len(kinds), p=p / p.sum()))]


def sample_combo(
    rng: np.random.Generator,
    patterned: bool = False,
    exclude: Collection[Combo] = EXCLUDED_COMBOS,
    avoid_labels: Collection[tuple[str, str]] = (),
) -> Combo:
    """A drawable ``(shape, colour, pattern, pattern_colour)``, patterned iff ``patterned``."""
    for _ in range(1000):
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = COLOURS[rng.integers(len(COLOURS))]
        if (colour, shape) in avoid_labels:
            continue
        pattern, second = "plain", None
        if patterned:
            choices = [p for p in SHAPE_PATTERNS[shape] if p != "plain"]
            pattern = choices[rng.integers(len(choices))]
            if pattern in TWO_COLOUR_PATTERNS:
                second = COLOURS[rng.integers(len(COLOURS))]
        combo = (shape, colour, pattern, second)
        if is_valid_combo(combo) and combo not in exclude:
            return combo
    raise RuntimeError("could not sample an allowed combination")


def place(
    rng: np.random.Generator,
    sizes: Sequence[float],
    tries: int = 200,
    occupied: Sequence[tuple[float, float, float]] = (),
) -> list[tuple[float, float]] | None:
    """Non-overlapping centres for objects of the given diameters, or ``None`` if none found.

    ``occupied`` holds ``(x, y, size)`` of objects already in the scene, to avoid as well.
    """
    placed: list[tuple[float, float, float]] = list(occupied)
    for s in sizes:
        lo, hi = s / 2 + _MARGIN, 1 - s / 2 - _MARGIN
        if lo > hi:
            return None
        for _ in range(tries):
            x, y = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
            if all(np.hypot(x - px, y - py) >= (s + ps) / 2 + _MARGIN for px, py, ps in placed):
                placed.append((x, y, s))
                break
        else:
            return None
    return [(x, y) for x, y, _ in placed[len(occupied) :]]


def sample_objects(
    rng: np.random.Generator,
    kind: str,
    pattern_prob: float = 0.3,
    exclude: Collection[Combo] = EXCLUDED_COMBOS,
) -> tuple[ObjectSpec, ...]:
    """Objects of a scene of ``kind`` (see module docstring)."""
    n = {"one": 1, "two": 2}.get(kind) or int(rng.integers(3, 5))
    combos: list[Combo] = []
    sizes: list[float] = []
    for _ in range(n):
        patterned = kind != "many" and rng.random() < pattern_prob
        combo = sample_combo(rng, patterned, exclude, avoid_labels={(c[1], c[0]) for c in combos})
        lo, hi = PATTERNED_SIZE_RANGES[kind] if patterned else SIZE_RANGES[kind]
        combos.append(combo)
        sizes.append(float(rng.uniform(lo, hi)))
    positions = place(rng, sizes)
    while positions is None:  # crowded: shrink everything a little and retry
        sizes = [s * 0.95 for s in sizes]
        positions = place(rng, sizes)
    return tuple(
        ObjectSpec(*combo, size=s, position=p)
        for combo, s, p in zip(combos, sizes, positions, strict=True)
    )


def sample_scene(
    rng: np.random.Generator,
    kind: str | None = None,
    mix: Mapping[str, float] | None = None,
    pattern_prob: float = 0.3,
    exclude: Collection[Combo] = EXCLUDED_COMBOS,
) -> Scene:
    """A random scene; ``kind`` defaults to a draw from ``mix``."""
    kind = kind or choose_kind(rng, mix)
    objects = sample_objects(rng, kind, pattern_prob, exclude)
    return Scene(objects, sample_background(rng))
