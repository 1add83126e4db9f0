"""Face photos for textual-inversion-style training (Cross Initialization's data handling).

Every item is one of the photos, cropped to a square around the face, resized to ``size``
(bicubic), flipped with probability ``flip_p`` and captioned with a random template filled with
the phrase, e.g. "a photo of a face of v1* v2* person".

The crop: CelebA-HQ / FFHQ-style photos (the reference's inputs) are already aligned squares, so
the default is the centred square. For other photos give face boxes, ``{"file.jpg": [x0, y0, x1,
y1], ...}`` in a JSON file (``boxes``) or a ``<image>.json`` sidecar with ``{"box": [...]}``: the
crop is the square of side ``margin`` x the box's longer side centred on the box, shifted (and,
if needed, shrunk) to stay inside the image. No face detector ships with the project (it would
need downloaded weights); a box from any detector can be written to the sidecar.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from data.datasets import IMAGE_SUFFIXES, is_readable_image, open_rgb
from data.templates import IMAGENET_TEMPLATES_SMALL
from data.transforms import to_array

log = logging.getLogger(__name__)

TEMPLATES = IMAGENET_TEMPLATES_SMALL  # textual inversion's (and Cross Initialization's)
Box = Sequence[float]


def square_around(box: Box, width: int, height: int, margin: float) -> tuple[int, int, int, int]:
    """The square crop (left, top, right, bottom) of side ``margin`` x the box's longer side,
    centred on ``box`` and moved (or shrunk) to fit the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"bad face box {list(box)}: need x1 > x0 and y1 > y0")
    side = min(round(max(x1 - x0, y1 - y0) * margin), width, height)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(min(max(round(cx - side / 2), 0), width - side))
    top = int(min(max(round(cy - side / 2), 0), height - side))
    return left, top, left + side, top + side


def face_crop(image: Image.Image, box: Box | None, margin: float = 1.6) -> Image.Image:
    """Square face crop: around ``box`` when given, else the centred square."""
    w, h = image.size
    if box is None:
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        return image.crop((left, top, left + s, top + s))
    return image.crop(square_around(box, w, h, margin))


def read_boxes(root: Path, paths: Sequence[Path], boxes: str | Path | None) -> dict[Path, Box]:
    """Face boxes from the ``boxes`` JSON (keys: file names or paths relative to ``root``) and
    from ``<image>.json`` sidecars (which win)."""
    table: Mapping[str, Box] = {}
    if boxes is not None:
        table = json.loads(Path(boxes).read_text())
        if not isinstance(table, Mapping):
            raise ValueError(f"{boxes}: expected a JSON object {{file: [x0, y0, x1, y1]}}")
    out = {}
    for p in paths:
        rel = str(p.relative_to(root))
        box = table.get(rel, table.get(p.name))
        side = p.with_suffix(".json")
        if side.is_file():
            box = json.loads(side.read_text()).get("box", box)
        if box is not None:
            if len(box) != 4:
                raise ValueError(f"{p}: a face box is [x0, y0, x1, y1], got {box}")
            out[p] = box
    return out


class FaceImages(Dataset):
    """Photos of one face under ``root`` (searched recursively), captioned from templates.

    Args:
        tokens: the placeholder tokens, joined by spaces into ``phrase``.
        phrase: the caption's subject, ``{}`` standing for the tokens.
        templates: caption templates with one ``{}`` (default: :data:`TEMPLATES`).
        repeat: epoch = images x repeat (the reference: 100).
        boxes: optional JSON of face boxes (see the module docstring); ``margin`` the crop size
            relative to a box.
        seed: a private RNG for templates and flips; None uses ``random`` (seeded per worker).
    """

    def __init__(
        self,
        root: str | Path,
        tokens: Sequence[str],
        phrase: str = "face of {} person",
        templates: Sequence[str] | None = None,
        size: int = 512,
        flip_p: float = 0.5,
        repeat: int = 100,
        boxes: str | Path | None = None,
        margin: float = 1.6,
        seed: int | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"face image folder not found: {self.root}")
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        self.paths = [p for p in files if is_readable_image(p)]
        if not self.paths:
            raise ValueError(f"{self.root}: no readable images")
        self.subject = phrase.format(" ".join(tokens))
        self.templates = list(templates or TEMPLATES)
        if any(t.count("{}") != 1 for t in self.templates):
            raise ValueError("every caption template needs exactly one {}")
        self.boxes = read_boxes(self.root, self.paths, boxes)
        self.margin = margin
        self.size = size
        self.flip_p = flip_p
        self.repeat = max(int(repeat), 1)
        self.rng = random.Random(seed) if seed is not None else random
        # Decoded and cropped once: a face set is a handful of photos.
        self.crops = [
            face_crop(open_rgb(p), self.boxes.get(p), margin).resize((size, size), Image.BICUBIC)
            for p in self.paths
        ]
        log.info(
            "%d images (%d with face boxes), subject %r", len(self.paths), len(self.boxes),
            self.subject,
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.paths) * self.repeat

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = self.crops[i % len(self.crops)]
        if self.rng.random() < self.flip_p:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        caption = self.rng.choice(self.templates).format(self.subject)
        return {"image": torch.from_numpy(to_array(image)), "caption": caption}
