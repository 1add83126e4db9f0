"""Captioned toy-world images for pretraining, and scenes rendered from explicit specs.

``ToyWorldDataset`` item ``i`` is drawn from ``numpy.random.default_rng([seed, i])``, so it is the
same image and caption in every process and epoch. Items are ``{"image": (H, W, 3) float32 in
[-1, 1], "caption": str}``, the CompVis convention (the model permutes to CHW).

:func:`make_example` gives the same item with its ground-truth objects; :func:`render_spec`
renders a hand-written scene (e.g. a benchmark prompt) and returns its caption and objects too.

CLI (regularization images of a class from the pretraining distribution, with their captions)::

    python -m toyworld.dataset --class-word triangle --n 200 --out DIR
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from toyworld.captions import TEMPLATES, caption
from toyworld.concepts import write_image_folder
from toyworld.sampler import PATTERNED_SIZE_RANGES, SIZE_RANGES, place, sample_scene
from toyworld.world import ObjectSpec, render_scene, sample_background

log = logging.getLogger(__name__)


class Example(NamedTuple):
    image: Image.Image
    caption: str
    objects: tuple[ObjectSpec, ...]


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (H, W, 3) float32 in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr / 127.5 - 1.0)


def make_example(
    index: int,
    seed: int = 0,
    size: int = 32,
    mix: Mapping[str, float] | None = None,
    pattern_prob: float = 0.3,
    class_word_prob: float = 0.1,
    templates: Sequence[str] = TEMPLATES,
) -> Example:
    """Item ``index`` of the pretraining stream ``seed``: image, caption and objects.

    ``class_word_prob`` is the chance that a one-object scene is captioned by its class word
    only ("a photo of a triangle"), so the class-word prompts of personalization are in
    distribution.
    """
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng, mix=mix, pattern_prob=pattern_prob)
    template = templates[int(rng.integers(len(templates)))]
    class_only = len(scene.objects) == 1 and rng.random() < class_word_prob
    text = caption(scene.objects, template, class_word_only=class_only)
    return Example(render_scene(scene.objects, size, scene.background), text, scene.objects)


class ToyWorldDataset(Dataset):
    """Deterministic captioned toy-world images (see :func:`make_example`)."""

    def __init__(
        self,
        size: int = 32,
        length: int = 100_000,
        seed: int = 0,
        mix: Mapping[str, float] | None = None,
        pattern_prob: float = 0.3,
        class_word_prob: float = 0.1,
    ) -> None:
        self.size = size
        self.length = length
        self.seed = seed
        self.mix = dict(mix) if mix is not None else None
        self.pattern_prob = pattern_prob
        self.class_word_prob = class_word_prob

    def __len__(self) -> int:
        return self.length

    def example(self, index: int) -> Example:
        """Item ``index`` with PIL image and ground-truth objects."""
        if not 0 <= index < self.length:
            raise IndexError(index)
        return make_example(
            index, self.seed, self.size, self.mix, self.pattern_prob, self.class_word_prob
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self.example(index)
        return {"image": pil_to_tensor(ex.image), "caption": ex.caption}


def build_objects(
    spec: Sequence[ObjectSpec | Mapping[str, Any]], rng: np.random.Generator
) -> tuple[ObjectSpec, ...]:
    """Complete a scene spec: dict entries without ``size``/``position`` get random ones.

    Dicts take ``ObjectSpec`` fields; ``shape`` and ``colour`` are required. Sizes follow the
    sampler's ranges for the scene's object count; positions avoid the objects already placed.
    """
    n = len(spec)
    kind = "one" if n == 1 else "two" if n == 2 else "many"
    fields: list[dict[str, Any]] = []
    for item in spec:
        f = asdict(item) if isinstance(item, ObjectSpec) else dict(item)
        f.setdefault("pattern", "plain")
        f.setdefault("pattern_colour", None)
        if "size" not in f:
            lo, hi = (SIZE_RANGES if f["pattern"] == "plain" else PATTERNED_SIZE_RANGES)[kind]
            f["size"] = float(rng.uniform(lo, hi))
        fields.append(f)
    fixed = [(*f["position"], f["size"]) for f in fields if "position" in f]
    free = [f for f in fields if "position" not in f]
    sizes = [f["size"] for f in free]
    positions = place(rng, sizes, occupied=fixed)
    while positions is None:
        sizes = [s * 0.95 for s in sizes]
        positions = place(rng, sizes, occupied=fixed)
    for f, s, p in zip(free, sizes, positions, strict=True):
        f["size"], f["position"] = s, p
    return tuple(ObjectSpec(**f) for f in fields)


def render_spec(
    spec: Sequence[ObjectSpec | Mapping[str, Any]],
    size: int = 32,
    seed: int = 0,
    background: tuple[int, int, int] | None = None,
    template: str = "a photo of {}",
) -> Example:
    """Render a structured scene spec; returns image, caption and the completed objects.

    Example: ``render_spec([{"shape": "circle", "colour": "red"},
    {"shape": "square", "colour": "blue", "pattern": "dots", "pattern_colour": "yellow"}])``.
    """
    rng = np.random.default_rng(seed)
    objects = build_objects(spec, rng)
    bg = background if background is not None else sample_background(rng)
    return Example(render_scene(objects, size, bg), caption(objects, template), objects)


def class_examples(class_word: str, n: int, size: int = 32, seed: int = 0) -> list[Example]:
    """The first ``n`` pretraining items (stream ``seed``) that contain a ``class_word`` object."""
    out: list[Example] = []
    index = 0
    while len(out) < n:
        ex = make_example(index, seed, size)
        if any(o.shape == class_word for o in ex.objects):
            out.append(ex)
        index += 1
    return out


def export_class_images(
    class_word: str, out: str | Path, n: int = 200, size: int = 32, seed: int = 0
) -> Path:
    """Regularization set: ``n`` pretraining images with a ``class_word`` and their captions.

    The offline stand-in for Custom Diffusion's LAION retrieval (same ``images.txt`` /
    ``caption.txt`` layout). Use a ``seed`` other than the pretraining stream's for held-out
    images.
    """
    examples = class_examples(class_word, n, size, seed)
    out = write_image_folder([e.image for e in examples], [e.caption for e in examples], out)
    log.info("wrote %d %s images to %s", n, class_word, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export toy-world regularization images.")
    parser.add_argument("--class-word", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(export_class_images(args.class_word, args.out, args.n, args.size, args.seed))


if __name__ == "__main__":
    main()
