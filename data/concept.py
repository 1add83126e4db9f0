"""Custom Diffusion training data: target images of a concept mixed with regularization images.

One concept is a dict in the reference ``--concepts_list`` JSON format::

    {"instance_prompt": "photo of a <new1> cat", "instance_data_dir": "data/cat",
     "class_prompt": "cat", "class_data_dir": "reg/cat"}

``class_data_dir`` (optional) is a folder in the reference layout (``images.txt`` +
``caption.txt``: real images keep their own captions) or a plain image folder captioned with
``class_prompt``; a list of such folders pools them into one regularization set.

**Mixing and prior weight.** As in the reference, a concept with N regularization images is an
epoch of 2N items: N regularization images and N target items (targets cycled), shuffled into
random batches, so on average half a batch is regularization. Every item enters the same
per-sample loss (masked targets normalised by their own mask area), so the **prior weight is
1**, like the reference's CompVis code. ``prior_loss_weight`` scales the regularization items'
losses (each item carries a ``loss_weight``), as DreamBooth's ``--prior_loss_weight`` does.
Without regularization images the epoch is the targets ``repeat`` times (``repeat=0``: once).

Several concepts (joint training) are interleaved with equal counts per epoch; the reference
splits every batch exactly in half and sums the two means, which has the same expected gradient
up to a constant factor (2) that Adam does not see.
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

from data.datasets import CaptionedImages, open_rgb
from data.transforms import Sample, plain, prepare, random_rescale

log = logging.getLogger(__name__)

CONCEPT_KEYS = ("instance_prompt", "instance_data_dir", "class_prompt", "class_data_dir")


def _image_list(root: str | Path, caption: str | None) -> list[tuple[Path, str]]:
    return CaptionedImages(root, size=1, caption=caption, flip_p=0.0).items


def _class_caption(root: Path, class_prompt: str | None) -> str | None:
    """Captions of a reference-layout folder are its own; other folders need ``class_prompt``."""
    if (root / "caption.txt").exists():
        return None
    if class_prompt is None:
        raise ValueError(f"{root} has no caption.txt: set class_prompt for its images")
    return class_prompt


def warn_if_small(path: Path, size: int, factor: int = 4) -> None:
    """One log line for an image upscaled more than ``factor`` times (it will be blurry)."""
    with Image.open(path) as im:
        side = min(im.size)
    if side * factor < size:
        log.warning("%s: %d px upscaled %.0fx to %d px, expect blur", path, side, size / side, size)


class ConceptDataset(Dataset):
    """One concept: augmented target images mixed 1:1 with regularization images.

    Args:
        instance_prompt: caption of every target image, with the concept's token.
        instance_data_dir: target images (either folder layout of ``CaptionedImages``).
        class_prompt: caption of regularization images that have none.
        class_data_dir: regularization images (a folder or a list of folders), or None.
        aug: the random-rescale augmentation on target images.
        repeat: epoch = targets x repeat when there are no regularization images.
        prior_loss_weight: loss weight of regularization items (targets: 1; reference: 1).
        seed: a private RNG for the augmentation; None uses ``random`` (seeded per worker).
    """

    def __init__(
        self,
        instance_prompt: str,
        instance_data_dir: str | Path,
        class_prompt: str | None = None,
        class_data_dir: str | Path | Sequence[str | Path] | None = None,
        size: int = 512,
        aug: bool = True,
        flip_p: float = 0.5,
        repeat: int = 0,
        prior_loss_weight: float = 1.0,
        seed: int | None = None,
    ) -> None:
        if prior_loss_weight < 0:
            raise ValueError(f"prior_loss_weight must be >= 0, got {prior_loss_weight}")
        self.targets = _image_list(instance_data_dir, instance_prompt)
        self.regs: list[tuple[Path, str]] = []
        if isinstance(class_data_dir, str | Path):
            class_data_dir = [class_data_dir]
        for root in map(Path, class_data_dir or []):
            self.regs += _image_list(root, _class_caption(root, class_prompt))
        self.size = size
        self.aug = aug
        self.flip_p = flip_p
        self.repeat = repeat
        self.prior_loss_weight = prior_loss_weight
        self.rng = random.Random(seed) if seed is not None else random
        counts = len(self.targets), len(self.regs)
        log.info("concept %r: %d target, %d regularization images", instance_prompt, *counts)
        for path, _ in self.targets:
            warn_if_small(path, size)

    def __len__(self) -> int:
        if self.regs:
            return 2 * len(self.regs)
        return len(self.targets) * max(self.repeat, 1)

    def is_regularization(self, i: int) -> bool:
        return i < len(self.regs)

    def sample(self, i: int) -> Sample:
        if self.is_regularization(i):
            path, caption = self.regs[i]
        else:
            path, caption = self.targets[(i - len(self.regs)) % len(self.targets)]
        image = prepare(open_rgb(path), self.flip_p, self.rng)
        if self.aug and not self.is_regularization(i):
            return random_rescale(image, caption, self.size, self.rng)
        return plain(image, caption, self.size)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.sample(i)
        return {
            "image": torch.from_numpy(s.image),
            "mask": torch.from_numpy(s.mask),
            "caption": s.caption,
            "loss_weight": self.prior_loss_weight if self.is_regularization(i) else 1.0,
        }


class BalancedConcat(Dataset):
    """Datasets interleaved with equal counts per epoch (shorter ones cycle)."""

    def __init__(self, datasets: Sequence[Dataset]) -> None:
        if not datasets:
            raise ValueError("no datasets")
        self.datasets = list(datasets)
        self.longest = max(len(d) for d in self.datasets)

    def __len__(self) -> int:
        return len(self.datasets) * self.longest

    def __getitem__(self, i: int) -> Any:
        d = self.datasets[i % len(self.datasets)]
        return d[(i // len(self.datasets)) % len(d)]


def read_concepts_list(path: str | Path) -> list[dict[str, Any]]:
    """The reference ``concepts_list`` JSON: a list of concept dicts."""
    concepts = json.loads(Path(path).read_text())
    if not isinstance(concepts, list) or not all(isinstance(c, dict) for c in concepts):
        raise ValueError(f"{path}: expected a JSON list of concept objects")
    return concepts


def concept_dataset(
    concepts: Sequence[Mapping[str, Any]] | None = None,
    concepts_list: str | Path | None = None,
    **options: Any,
) -> Dataset:
    """One :class:`ConceptDataset` per concept (``concepts``, or the JSON ``concepts_list``,
    which takes precedence), interleaved when there are several.

    ``options`` (``size``, ``aug``, ``flip_p``, ``repeat``, ``prior_loss_weight``, ``seed``)
    apply to every concept.
    """
    items = read_concepts_list(concepts_list) if concepts_list else list(concepts or [])
    if not items:
        raise ValueError("no concepts: set data.train.concepts or data.train.concepts_list")
    datasets = []
    for concept in items:
        unknown = set(concept) - set(CONCEPT_KEYS)
        if unknown:
            raise ValueError(f"unknown concept keys {sorted(unknown)} (known: {CONCEPT_KEYS})")
        datasets.append(ConceptDataset(**concept, **options))
    return datasets[0] if len(datasets) == 1 else BalancedConcat(datasets)
