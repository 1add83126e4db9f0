"""Toy-world metrics: sample prompts x seeds from a model and score the images with the judge.

Every image is reproducible: image ``j`` of a prompt starts from the noise of seed ``seed + j``
(independent of the batch and of the other prompts), DDIM 50 (eta 0) at the toy base's guidance
5.0, so two models see the same noise for the same prompt and their rates compare pairwise.

Prompt families for a novel concept (``toyworld.concepts``, class word = its shape), with ``T``
its token (``<new1>``) and "square" its class word:

- ``concept``: "a photo of a T square", "a T square" -> :func:`concept_rate` (the concept is
  there);
- ``class``: the same prompts with the class word only -> the concept rate of the plain class
  word (on the base: how often the base draws it unasked; after fine-tuning: prior leakage);
- ``align``: the token with a second object ("a photo of a T square and a red circle") or in
  another colour ("a photo of a green T square") -> :func:`object_rate` of the object the extra
  words ask for (the prompt is still obeyed).

The low-level functions (:func:`sample`, :func:`judge_samples`, the rates) take any prompts;
:func:`evaluate_concept` runs the families above and returns the rates plus a grid.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import Tensor

from ldm.generate import generate
from ldm.image_io import make_grid, to_pil
from toyworld.captions import with_article
from toyworld.concepts import CONCEPTS, Concept
from toyworld.judge import Judge
from toyworld.world import COLOURS, SHAPES

log = logging.getLogger(__name__)

GUIDANCE = 5.0  # the toy base's shipped guidance scale (models/toy/MODEL_CARD.md)
STEPS = 50
SEED = 1000
CONCEPT_TEMPLATES: tuple[str, ...] = ("a photo of {}", "{}")

Obj = tuple[str, str]  # (colour, shape)


@dataclass
class Samples:
    """Images of a prompt list (prompt-major, ``seeds`` per prompt) and what the judge saw."""

    prompts: list[str]  # one per image
    images: Tensor  # (N, 3, H, W) in [0, 1]
    objects: list[set[Obj]]
    concepts: list[set[str]]
    seeds: int

    def __len__(self) -> int:
        return len(self.prompts)

    def split(self, n_prompts: int) -> tuple[Samples, Samples]:
        """The first ``n_prompts`` prompts' samples and the rest."""
        k = n_prompts * self.seeds
        head = Samples(self.prompts[:k], self.images[:k], self.objects[:k], self.concepts[:k],
                       self.seeds)  # fmt: skip
        tail = Samples(self.prompts[k:], self.images[k:], self.objects[k:], self.concepts[k:],
                       self.seeds)  # fmt: skip
        return head, tail


@dataclass
class Report:
    """Rates (JSON-ready floats) and the samples they came from, by family."""

    rates: dict[str, float]
    samples: dict[str, Samples] = field(default_factory=dict)

    def grid(self, columns: int = 8, prompts_per_family: int | None = None) -> Image.Image:
        """One row per prompt (first ``columns`` seeds), families in order."""
        rows = []
        for s in self.samples.values():
            n_prompts = len(s) // s.seeds
            for p in range(min(n_prompts, prompts_per_family or n_prompts)):
                rows.append(s.images[p * s.seeds : p * s.seeds + min(columns, s.seeds)])
        width = max(r.shape[0] for r in rows)
        blank = torch.ones(1, *rows[0].shape[1:])
        padded = [torch.cat([r, blank.expand(width - r.shape[0], -1, -1, -1)]) for r in rows]
        return make_grid(to_pil(torch.cat(padded)), ncols=width)


@torch.no_grad()
def sample(
    model,
    prompts: Sequence[str],
    seeds: int = 8,
    *,
    steps: int = STEPS,
    guidance_scale: float = GUIDANCE,
    seed: int = SEED,
) -> Tensor:
    """``seeds`` images per prompt, prompt-major: (len(prompts) * seeds, 3, H, W) in [0, 1]."""
    if seeds < 1 or not prompts:
        raise ValueError(f"need prompts and seeds >= 1 (got {len(prompts)} prompts, {seeds})")
    was_training = model.training
    model.eval()
    try:
        out = [
            generate(model, [p] * seeds, steps=steps, guidance_scale=guidance_scale, seed=seed,
                     progress=False)
            for p in prompts
        ]  # fmt: skip
    finally:
        model.train(was_training)
    return torch.cat(out)


def judge_samples(judge: Judge, prompts: Sequence[str], images: Tensor, seeds: int) -> Samples:
    """Score prompt-major ``images`` (``seeds`` per prompt) with the judge."""
    if images.shape[0] != len(prompts) * seeds:
        raise ValueError(f"{images.shape[0]} images for {len(prompts)} prompts x {seeds} seeds")
    x = images * 2 - 1
    per_image = [p for p in prompts for _ in range(seeds)]
    return Samples(per_image, images, judge.objects(x), judge.concepts(x), seeds)


def sample_and_judge(model, judge: Judge, prompts: Sequence[str], seeds: int = 8, **kw) -> Samples:
    """:func:`sample` then :func:`judge_samples`."""
    return judge_samples(judge, prompts, sample(model, prompts, seeds, **kw), seeds)


def concept_rate(samples: Samples, concept: str) -> float:
    """Fraction of images in which the judge finds ``concept``."""
    if concept not in CONCEPTS:
        raise KeyError(f"unknown concept {concept!r}; known: {sorted(CONCEPTS)}")
    return sum(concept in c for c in samples.concepts) / len(samples)


def object_rate(samples: Samples, expected: Sequence[Obj]) -> float:
    """Fraction of images holding their prompt's expected ``(colour, shape)``; ``expected`` has
    one entry per prompt."""
    n_prompts = len(samples) // samples.seeds
    if len(expected) != n_prompts:
        raise ValueError(f"{len(expected)} expected objects for {n_prompts} prompts")
    per_image = [e for e in expected for _ in range(samples.seeds)]
    hits = sum(tuple(e) in o for e, o in zip(per_image, samples.objects, strict=True))
    return hits / len(samples)


def joint_rate(samples: Samples, concept: str, expected: Sequence[Obj]) -> float:
    """Fraction of images holding both ``concept`` and their prompt's expected object."""
    per_image = [e for e in expected for _ in range(samples.seeds)]
    hits = sum(
        concept in c and tuple(e) in o
        for e, c, o in zip(per_image, samples.concepts, samples.objects, strict=True)
    )
    return hits / len(samples)


def _concept(name: str) -> Concept:
    if name not in CONCEPTS:
        raise KeyError(f"unknown concept {name!r}; known: {sorted(CONCEPTS)}")
    return CONCEPTS[name]


def concept_prompts(
    concept: str, token: str | None, templates: Sequence[str] = CONCEPT_TEMPLATES
) -> list[str]:
    """Prompts "a photo of a <token> square", ...; ``token=None`` gives the class word alone."""
    noun = _concept(concept).class_word
    phrase = with_article(f"{token} {noun}" if token else noun)
    return [t.format(phrase) for t in templates]


def alignment_prompts(
    concept: str, token: str | None, n_objects: int = 4, n_colours: int = 2
) -> list[tuple[str, Obj]]:
    """``(prompt, expected object)`` pairs: the concept with a second object ("a photo of a
    <token> square and a red circle", other shape, colours not the concept's) and in another
    colour ("a photo of a green <token> square", expecting a green square)."""
    c = _concept(concept)
    noun = f"{token} {c.class_word}" if token else c.class_word
    own = {c.colour, c.pattern_colour}
    colours = [x for x in COLOURS if x not in own]
    shapes = [s for s in SHAPES if s != c.class_word]
    out = []
    for i in range(n_objects):
        obj = (colours[i % len(colours)], shapes[(2 * i + 1) % len(shapes)])
        out.append((f"a photo of {with_article(noun)} and {with_article(' '.join(obj))}", obj))
    for i in range(n_colours):
        colour = colours[(i + n_objects) % len(colours)]
        out.append((f"a photo of {with_article(f'{colour} {noun}')}", (colour, c.class_word)))
    return out


def evaluate_concept(
    model,
    judge: Judge,
    concept: str,
    token: str | None,
    seeds: int = 8,
    families: Sequence[str] = ("concept", "class", "align"),
    **sample_kw,
) -> Report:
    """Rates of the prompt families (module docstring) for ``concept`` on ``model``.

    Keys: ``concept_rate`` (``concept``), ``class_concept_rate`` (``class``), and for ``align``
    ``text_align_rate`` (the extra object or colour is there, over all its prompts),
    ``text_align_object_rate`` / ``text_align_colour_rate`` (the two kinds of prompt apart)
    and ``text_align_concept_rate`` (the second object is there and so is the concept). Without
    a token the ``concept`` and ``align`` families use the class word.
    """
    unknown = set(families) - {"concept", "class", "align"}
    if unknown:
        raise ValueError(f"unknown prompt families {sorted(unknown)}")
    report = Report({})
    if "concept" in families:
        s = sample_and_judge(model, judge, concept_prompts(concept, token), seeds, **sample_kw)
        report.samples["concept"] = s
        report.rates["concept_rate"] = concept_rate(s, concept)
    if "class" in families:
        s = sample_and_judge(model, judge, concept_prompts(concept, None), seeds, **sample_kw)
        report.samples["class"] = s
        report.rates["class_concept_rate"] = concept_rate(s, concept)
    if "align" in families:
        pairs = alignment_prompts(concept, token)
        prompts, expected = [p for p, _ in pairs], [e for _, e in pairs]
        s = sample_and_judge(model, judge, prompts, seeds, **sample_kw)
        report.samples["align"] = s
        report.rates["text_align_rate"] = object_rate(s, expected)
        n_obj = sum(" and " in p for p in prompts)  # second-object prompts come first
        second, colour = s.split(n_obj)
        report.rates["text_align_object_rate"] = object_rate(second, expected[:n_obj])
        report.rates["text_align_colour_rate"] = object_rate(colour, expected[n_obj:])
        report.rates["text_align_concept_rate"] = joint_rate(second, concept, expected[:n_obj])
    report.rates = {k: round(v, 4) for k, v in report.rates.items()}
    log.info("%s (%s): %s", concept, token, report.rates)
    return report
