"""ViCo training data (the reference ``PersonalizedBase``): each image with a reference image.

Every item is one of the concept's images, resized (bicubic, no crop, no flip) to ``size``, a
caption from a template filled with the placeholder ("a photo of a *"), and a reference image
drawn uniformly from the *other* images (the same one only when there is just one). The epoch is
the images ``repeat`` times, as in the reference (100).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data.datamodule import DataModule
from data.datasets import CaptionedImages, open_rgb
from data.templates import IMAGENET_TEMPLATES_SMALL

log = logging.getLogger(__name__)


def _to_array(image: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) float32 in [-1, 1]; the whole image is resized, as the reference does."""
    image = image.resize((size, size), Image.BICUBIC)
    return np.asarray(image, dtype=np.float32) / 127.5 - 1.0


class ViCoDataset(Dataset):
    """A concept's images with captions and reference images.

    Args:
        data_root: a folder of images (plain, or the ``images.txt`` layout); every readable
            image is used and unreadable ones are skipped with a logged line.
        placeholder: the string the templates are filled with.
        templates: caption templates with one ``{}``; ``None`` for ``imagenet_templates_small``.
        repeat: epoch length in passes over the images.
        seed: a private RNG for templates and references; None uses ``random``.
    """

    def __init__(
        self,
        data_root: str | Path,
        size: int = 512,
        placeholder: str = "*",
        templates: Sequence[str] | None = None,
        repeat: int = 100,
        seed: int | None = None,
    ) -> None:
        self.paths = [p for p, _ in CaptionedImages(data_root, size=1, caption="", flip_p=0).items]
        self.templates = tuple(templates) if templates else IMAGENET_TEMPLATES_SMALL
        bad = [t for t in self.templates if t.count("{}") != 1]
        if bad:
            raise ValueError(f"caption templates need exactly one {{}}: {bad[:3]}")
        self.size = size
        self.placeholder = placeholder
        self.repeat = max(int(repeat), 1)
        self.rng = random.Random(seed) if seed is not None else random
        self.images = [_to_array(open_rgb(p), size) for p in self.paths]
        log.info("ViCo data: %d images from %s, %d templates", len(self.paths), data_root,
                 len(self.templates))  # fmt: skip

    def __len__(self) -> int:
        return len(self.paths) * self.repeat

    def reference_index(self, i: int) -> int:
        n = len(self.paths)
        if n == 1:
            return i
        j = self.rng.randrange(n - 1)
        return j + (j >= i)  # uniform over the others

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = index % len(self.paths)
        template = self.rng.choice(self.templates)
        return {
            "image": torch.from_numpy(self.images[i]),
            "reference": torch.from_numpy(self.images[self.reference_index(i)]),
            "caption": template.format(self.placeholder),
        }


def vico_datamodule(
    data_root: str | Path,
    size: int = 512,
    placeholder: str = "*",
    templates: Sequence[str] | None = None,
    repeat: int = 100,
    batch_size: int = 1,
    num_workers: int = 0,
    seed: int | None = None,
) -> DataModule:
    """The datamodule of ``configs/data/vico.yaml`` (``data.data_root=DIR``)."""
    train = ViCoDataset(data_root, size, placeholder, templates, repeat, seed)
    return DataModule(train, batch_size=batch_size, num_workers=num_workers)
