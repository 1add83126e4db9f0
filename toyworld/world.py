"""Visual vocabulary of the toy world and its deterministic, anti-aliased renderer.

An object is a shape in a saturated colour, optionally decorated with a pattern that uses a second
colour. A scene is a light, slightly tinted background with 1-4 non-overlapping objects. Objects
are never rotated: triangles point up, diamonds stand on a corner.

Geometry is resolution independent: ``size`` is the object's diameter and ``position`` its centre,
both as fractions of the image side. Rendering draws at ``supersample``x the output size with PIL
and downsamples with a box filter, so edges are anti-aliased and the same spec gives the same
pixels every time.

Patterns (``pattern_colour`` is the second colour):

- ``plain``: one colour (the default, most common).
- ``stripes``: three horizontal stripes in the second colour (7 equal bands, bands 1, 3 and 5).
- ``dots``: a 3x3 grid of dots in the second colour, clipped to the shape.
- ``outline``: hollow, a thick border in the main colour (no second colour). Not for circles
  (an outlined circle would be a ring), crosses or rings.
- ``twotone``: left half in the main colour, right half in the second colour.

Crosses and rings are too thin for stripes, dots or outlines; they take ``plain`` or ``twotone``.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")

# Saturated object colours that stay distinct from each other and from light backgrounds.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 30),
    "green": (25, 155, 45),
    "blue": (30, 70, 215),
    "yellow": (240, 200, 0),
    "purple": (135, 40, 175),
    "orange": (245, 125, 0),
}
COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)

PATTERNS: tuple[str, ...] = ("plain", "stripes", "dots", "outline", "twotone")
# Patterns that need a second colour.
TWO_COLOUR_PATTERNS: frozenset[str] = frozenset({"stripes", "dots", "twotone"})

SHAPE_PATTERNS: dict[str, tuple[str, ...]] = {
    "circle": ("plain", "stripes", "dots", "twotone"),
    "square": PATTERNS,
    "triangle": PATTERNS,
    "cross": ("plain", "twotone"),
    "ring": ("plain", "twotone"),
    "diamond": PATTERNS,
}

# Colour pairs too close in hue to tell apart as a small pattern at 32 px; never combined.
LOW_CONTRAST: frozenset[frozenset[str]] = frozenset(
    {frozenset(p) for p in (("red", "orange"), ("orange", "yellow"), ("blue", "purple"))}
)

# Polygon vertices in unit coordinates: the object's bounding disc has radius 1, y points down.
_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)],
    "triangle": [(0.0, -0.95), (1.0, 0.8), (-1.0, 0.8)],
    "diamond": [(0.0, -1.0), (0.78, 0.0), (0.0, 1.0), (-0.78, 0.0)],
    "cross": [
        (-0.3, -1.0),
        (0.3, -1.0),
        (0.3, -0.3),
        (1.0, -0.3),
        (1.0, 0.3),
        (0.3, 0.3),
        (0.3, 1.0),
        (-0.3, 1.0),
        (-0.3, 0.3),
        (-1.0, 0.3),
        (-1.0, -0.3),
        (-0.3, -0.3),
    ],
}
_RING_INNER = 0.55  # inner radius of a ring, relative to its outer radius
_OUTLINE_INNER = 0.5  # hollow part of an outlined shape, scaled about its incentre


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a scene.

    Attributes:
        shape: one of ``SHAPES``.
        colour: main colour, one of ``COLOURS``.
        pattern: one of ``SHAPE_PATTERNS[shape]``.
        pattern_colour: second colour for stripes/dots/twotone, else ``None``.
        size: diameter as a fraction of the image side.
        position: centre ``(x, y)`` as fractions of the image side.
    """

    shape: str
    colour: str
    pattern: str = "plain"
    pattern_colour: str | None = None
    size: float = 0.5
    position: tuple[float, float] = (0.5, 0.5)

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.colour not in COLOUR_RGB:
            raise ValueError(f"unknown colour {self.colour!r}")
        if self.pattern not in SHAPE_PATTERNS[self.shape]:
            raise ValueError(f"pattern {self.pattern!r} not drawable on a {self.shape}")
        needs_second = self.pattern in TWO_COLOUR_PATTERNS
        if needs_second != (self.pattern_colour is not None):
            raise ValueError(f"{self.pattern!r} with pattern_colour={self.pattern_colour!r}")
        if self.pattern_colour is not None and self.pattern_colour not in COLOUR_RGB:
            raise ValueError(f"unknown pattern colour {self.pattern_colour!r}")

    @property
    def label(self) -> tuple[str, str]:
        """``(colour, shape)``: what the judge's object head reports."""
        return (self.colour, self.shape)

    @property
    def combo(self) -> tuple[str, str, str, str | None]:
        """``(shape, colour, pattern, pattern_colour)``: identity without placement."""
        return (self.shape, self.colour, self.pattern, self.pattern_colour)


@dataclass(frozen=True)
class Scene:
    """Objects on a background colour."""

    objects: tuple[ObjectSpec, ...]
    background: tuple[int, int, int] = (240, 240, 240)


def sample_background(rng: np.random.Generator) -> tuple[int, int, int]:
    """A light background: grey or a faint pastel tint of a random hue."""
    hue = rng.random()
    sat = rng.uniform(0.0, 0.14)
    val = rng.uniform(0.86, 0.98)
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return (round(r * 255), round(g * 255), round(b * 255))


def _to_px(
    pts: Sequence[tuple[float, float]], cx: float, cy: float, r: float, scale: float = 1.0
) -> list[tuple[float, float]]:
    return [(cx + x * r * scale, cy + y * r * scale) for x, y in pts]


def _incentre(pts: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Incentre of a triangle (scaling about it keeps the border width uniform)."""
    (ax, ay), (bx, by), (qx, qy) = pts
    a = np.hypot(bx - qx, by - qy)
    b = np.hypot(ax - qx, ay - qy)
    c = np.hypot(ax - bx, ay - by)
    s = a + b + c
    return ((a * ax + b * bx + c * qx) / s, (a * ay + b * by + c * qy) / s)


def _shape_mask(
    shape: str, canvas: int, cx: float, cy: float, r: float, scale: float = 1.0
) -> Image.Image:
    """Filled mask ("L") of ``shape`` with radius ``r * scale`` centred at (cx, cy) in pixels."""
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    if shape in ("circle", "ring"):
        rr = r * scale
        draw.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), fill=255)
        if shape == "ring":
            ri = rr * _RING_INNER
            draw.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=0)
        return mask
    pts = _POLYGONS[shape]
    if shape == "triangle" and scale != 1.0:
        ix, iy = _incentre(pts)
        pts = [(ix + (x - ix) * scale, iy + (y - iy) * scale) for x, y in pts]
        draw.polygon(_to_px(pts, cx, cy, r), fill=255)
    else:
        draw.polygon(_to_px(pts, cx, cy, r, scale), fill=255)
    return mask


def _pattern_mask(obj: ObjectSpec, canvas: int, cx: float, cy: float, r: float) -> Image.Image:
    """Unclipped mask of the second-colour region of a stripes/dots/twotone pattern."""
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    if obj.pattern == "stripes":
        band = 2 * r / 7
        for k in (1, 3, 5):
            top = cy - r + k * band
            draw.rectangle((cx - r - 1, top, cx + r + 1, top + band), fill=255)
    elif obj.pattern == "dots":
        step, dot = 0.62 * r, 0.2 * r
        # Triangles are wide at the bottom: shift the grid down so the top row stays inside.
        oy = cy + (0.2 * r if obj.shape == "triangle" else 0.0)
        for i in (-1, 0, 1):
            for j in (-1, 0, 1):
                x, y = cx + i * step, oy + j * step
                draw.ellipse((x - dot, y - dot, x + dot, y + dot), fill=255)
    elif obj.pattern == "twotone":
        draw.rectangle((cx, cy - r - 1, cx + r + 1, cy + r + 1), fill=255)
    return mask


def draw_object(canvas: Image.Image, obj: ObjectSpec) -> None:
    """Draw ``obj`` onto an RGB ``canvas`` in place (use a supersampled canvas)."""
    n = canvas.size[0]
    cx, cy = obj.position[0] * n, obj.position[1] * n
    r = obj.size * n / 2
    body = _shape_mask(obj.shape, n, cx, cy, r)
    if obj.pattern == "outline":
        body = ImageChops.subtract(body, _shape_mask(obj.shape, n, cx, cy, r, _OUTLINE_INNER))
    canvas.paste(COLOUR_RGB[obj.colour], mask=body)
    if obj.pattern_colour is not None:
        second = ImageChops.multiply(body, _pattern_mask(obj, n, cx, cy, r))
        canvas.paste(COLOUR_RGB[obj.pattern_colour], mask=second)


def render_scene(
    objects: Sequence[ObjectSpec],
    size: int = 32,
    background: tuple[int, int, int] = (240, 240, 240),
    supersample: int = 4,
) -> Image.Image:
    """Render objects (drawn in order) on a plain background; returns an RGB PIL image."""
    big = size * supersample
    canvas = Image.new("RGB", (big, big), tuple(background))
    for obj in objects:
        draw_object(canvas, obj)
    if supersample == 1:
        return canvas
    return canvas.resize((size, size), Image.Resampling.BOX)


def render(scene: Scene, size: int = 32, supersample: int = 4) -> Image.Image:
    """Render a :class:`Scene`."""
    return render_scene(scene.objects, size, scene.background, supersample)
