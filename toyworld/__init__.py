"""Toy world: procedurally drawn, captioned images for pretraining a small latent diffusion model.

Scenes are 1-4 non-overlapping objects on a light, faintly tinted background, drawn
anti-aliased at 32x32 by default. An object is a shape (circle, square, triangle, cross, ring,
diamond) in a saturated colour (red, green, blue, yellow, purple, orange), optionally with a
pattern in a second colour (stripes, dots, twotone halves) or hollow (outline). Captions read
"a photo of a red circle and a blue square with yellow dots" (grammar: ``toyworld.captions``).

Six novel concepts (``CONCEPTS``, e.g. a purple triangle with orange dots) are combinations of
known parts that pretraining never shows; personalization methods learn them from a few images
captioned with their class word. A small CNN ``Judge`` scores generated images: which
(colour, shape) objects and which concepts they contain.

Item ``i`` of ``ToyWorldDataset`` is the same image for a given seed, everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from toyworld.concepts import CONCEPTS, Concept
    from toyworld.dataset import ToyWorldDataset, make_example, render_spec
    from toyworld.judge import Judge, evaluate_judge
    from toyworld.world import COLOURS, PATTERNS, SHAPES, ObjectSpec, render_scene

# Everything loads on first use: the vocabulary imports without torch, and `python -m
# toyworld.concepts` does not find its module already imported by the package.
_LAZY = {
    "COLOURS": "toyworld.world",
    "PATTERNS": "toyworld.world",
    "SHAPES": "toyworld.world",
    "ObjectSpec": "toyworld.world",
    "render_scene": "toyworld.world",
    "CONCEPTS": "toyworld.concepts",
    "Concept": "toyworld.concepts",
    "ToyWorldDataset": "toyworld.dataset",
    "make_example": "toyworld.dataset",
    "render_spec": "toyworld.dataset",
    "Judge": "toyworld.judge",
    "evaluate_judge": "toyworld.judge",
}

__all__ = [
    "COLOURS",
    "CONCEPTS",
    "PATTERNS",
    "SHAPES",
    "Concept",
    "Judge",
    "ObjectSpec",
    "ToyWorldDataset",
    "evaluate_judge",
    "make_example",
    "render_scene",
    "render_spec",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'toyworld' has no attribute {name!r}")
