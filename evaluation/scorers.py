"""The scorer interface, the reference's alignment formulas, and the toy-world judge scorer.

A scorer is a callable ``scorer(samples, targets, context) -> {metric: [value per sample]}``
(``None`` where a metric does not apply to a sample) with a ``name`` and the names of its
``text_metric`` and ``image_metric`` (for the comparison plot). Config picks them
(``configs/scorers/*.yaml``); evaluation averages the per-sample values per prompt and overall.

The formulas are those of CustomConcept101's ``evaluate.py``:

* text alignment (CLIPScore): ``w * max(cos(image, text), 0)`` per image, ``w = 2.5``;
* image alignment: the mean of the generated x training-image cosine matrix, i.e. per generated
  image the mean cosine to every training image, averaged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Sample:
    """One generated image and the prompt it was sampled from."""

    path: Path
    prompt: str  # sampled, with the run's tokens
    text: str  # scored for text alignment (class phrase instead of the tokens)
    kind: str  # "concept", "align" or "prior" (evaluation.prompts)
    seed: int


@dataclass(frozen=True)
class Context:
    """What some scorers need to know about the run."""

    toy_concept: str | None = None
    tokens: list[str] = field(default_factory=list)


Scores = dict[str, list[float | None]]


class Scorer(Protocol):
    name: str
    text_metric: str | None
    image_metric: str | None

    def __call__(
        self, samples: Sequence[Sample], targets: Sequence[Path], context: Context
    ) -> Scores: ...


def text_alignment(image_feats: torch.Tensor, text_feats: torch.Tensor, weight: float = 2.5):
    """CLIPScore per pair of rows: ``weight * max(cos, 0)``, shape (N,)."""
    a = F.normalize(image_feats.double(), dim=-1)
    b = F.normalize(text_feats.double(), dim=-1)
    return weight * (a * b).sum(-1).clamp_min(0)


def image_alignment(image_feats: torch.Tensor, target_feats: torch.Tensor) -> torch.Tensor:
    """Per generated image, the mean cosine to every target image, shape (N,)."""
    a = F.normalize(image_feats.double(), dim=-1)
    b = F.normalize(target_feats.double(), dim=-1)
    return (a @ b.T).mean(1)


def reference_transform(
    image: Image.Image,
    resize: int,
    crop: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """The reference's torchvision pipeline in PIL: ``Resize(resize, BICUBIC)`` (shorter side),
    ``CenterCrop(crop)``, RGB, ``ToTensor()``, ``Normalize(mean, std)`` -> (3, crop, crop)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    if short != resize:
        new_long = int(resize * long / short)
        size = (resize, new_long) if w <= h else (new_long, resize)
        image = image.resize(size, Image.BICUBIC)
    w, h = image.size
    if w < crop or h < crop:  # torchvision pads with zeros first
        canvas = Image.new(image.mode, (max(w, crop), max(h, crop)))
        canvas.paste(image, ((max(w, crop) - w) // 2, (max(h, crop) - h) // 2))
        image, (w, h) = canvas, canvas.size
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop)).convert("RGB")
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def open_images(paths: Sequence[Path]) -> list[Image.Image]:
    out = []
    for p in paths:
        with Image.open(p) as im:
            im.load()
            out.append(im)
    return out


def mean_or_none(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


class ToyJudgeScorer:
    """The toy world's judge as a scorer.

    ``judge_concept`` (image alignment): the judge sees the run's concept in the image.
    ``judge_text`` (text alignment): every object the scored prompt names is there — a named
    colour and shape as that object, a bare class word as any object of that shape. Prompts
    outside the toy grammar get ``None``.

    Args:
        weights: judge weights (default: the shipped ``toyworld/judge.safetensors``).
        concept: the toy concept's name; default: the one the run's ``prepare`` exported.
    """

    name = "toy_judge"
    text_metric = "judge_text"
    image_metric = "judge_concept"

    def __init__(
        self, weights: str | None = None, concept: str | None = None, threshold: float = 0.5
    ) -> None:
        self.weights = weights
        self.concept = concept
        self.threshold = threshold
        self._judge = None

    @property
    def judge(self):
        if self._judge is None:
            from toyworld.judge import Judge

            self._judge = Judge.load(self.weights)
        return self._judge

    def __call__(self, samples: Sequence[Sample], targets: Sequence[Path], context: Context):
        from toyworld.captions import parse_caption
        from toyworld.judge import CONCEPT_NAMES, OBJECT_LABELS

        concept = self.concept or context.toy_concept
        if concept is not None and concept not in CONCEPT_NAMES:
            raise ValueError(f"toy_judge: unknown concept {concept!r}; known: {CONCEPT_NAMES}")
        probs = self.judge.probs(open_images([s.path for s in samples]))
        objects = probs["objects"] > self.threshold
        out: Scores = {"judge_concept": [], "judge_text": []}
        if concept is not None:
            seen = probs["concepts"][:, CONCEPT_NAMES.index(concept)] > self.threshold
            out["judge_concept"] = [float(v) for v in seen]
        else:
            log.warning("toy_judge: no toy concept for this run; judge_concept left out")
            del out["judge_concept"]
        for i, sample in enumerate(samples):
            try:
                wanted = [(c, shape) for shape, c, _, _ in parse_caption(sample.text) if c]
            except ValueError:
                wanted = []
            found = {OBJECT_LABELS[j] for j in objects[i].nonzero().flatten().tolist()}
            out["judge_text"].append(float(set(wanted) <= found) if wanted else None)
        return out
