"""Evaluation prompts: a prompt file, the toy world's families, or a CustomConcept101 concept.

A prompt file has one template per line (blank lines and ``#`` comments skipped). ``{}`` stands
for the concept phrase of the run (``<new1> barn``: its instance prompt from the first
placeholder token on), as in the CustomConcept101 files; ``{class}`` for the class phrase
(``barn``). A template with ``{}`` is a *concept* prompt; one without is a *prior* prompt (it
measures what the class word still gives after fine-tuning).

``prompts=toy`` builds the prompt families of :mod:`toyworld.metrics` (the toy benchmarks'
prompts) for the run's toy concept: the concept alone, the concept with a second object or in
another colour, and the class word alone (prior).

Each prompt has the text sampled (``prompt``) and the text scored for text alignment (``text``):
the same template with the class phrase in place of the concept phrase, since a scoring CLIP
does not know the run's tokens.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

TOY = "toy"
_ARTICLE = re.compile(r"^(?:an? )?(?:photo|picture|image) of (?:an? |the )?", re.IGNORECASE)


KINDS = ("concept", "align", "prior")


def kind_of(template: str) -> str:
    return "concept" if "{}" in template else "prior"


@dataclass(frozen=True)
class Prompt:
    template: str
    prompt: str  # sampled
    text: str  # scored (class phrase instead of the concept phrase)
    kind: str  # "concept", "align" (the concept plus other asked-for content) or "prior"


@dataclass(frozen=True)
class PromptSource:
    """Templates and where they came from; CustomConcept101 adds its concept's phrases."""

    name: str
    templates: tuple[str, ...]
    kinds: tuple[str, ...] = ()  # per template; default: concept with "{}", else prior
    concept_phrase: str | None = None
    class_phrase: str | None = None
    targets: Path | None = None


def read_templates(path: Path) -> tuple[str, ...]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    templates = tuple(line for line in lines if line and not line.startswith("#"))
    if not templates:
        raise ValueError(f"{path}: no prompts")
    bad = [t for t in templates if re.search(r"\{\d+\}", t)]
    if bad:
        raise ValueError(f"{path}: multi-concept templates ({bad[0]!r}) are not supported")
    return templates


def cc101_entry(name: str, root: Path) -> dict | None:
    """The CustomConcept101 ``dataset.json`` entry named by its folder (``pet_cat1``) or prompt
    file (``cat``, the first concept using it)."""
    index = root / "dataset.json"
    if not index.exists():
        return None
    entries = json.loads(index.read_text())
    for entry in entries:
        if Path(entry["instance_data_dir"]).name == name:
            return entry
    for entry in entries:
        if Path(entry["prompt_filename"]).stem == name:
            return entry
    return None


def toy_source(concept: str) -> PromptSource:
    """:mod:`toyworld.metrics`' prompt families for a toy concept, as templates: ``concept``
    (the concept alone), ``align`` (with a second object, in another colour), ``prior`` (the
    class word alone)."""
    from toyworld.concepts import CONCEPTS
    from toyworld.metrics import alignment_prompts, concept_prompts

    mark = "\x00"
    noun = f"{mark} {CONCEPTS[concept].class_word}"
    alone = concept_prompts(concept, mark)
    align = [p for p, _ in alignment_prompts(concept, mark)]
    prior = concept_prompts(concept, None)
    templates = tuple(p.replace(noun, "{}") for p in alone + align) + tuple(prior)
    kinds = ("concept",) * len(alone) + ("align",) * len(align) + ("prior",) * len(prior)
    return PromptSource(TOY, templates, kinds)


def resolve(
    spec: str, cc101_dir: str | Path | None = None, toy_concept: str | None = None
) -> PromptSource:
    """A prompt file path, ``toy`` (needs the run's toy concept), or a CustomConcept101 concept
    (its folder name ``pet_cat1`` or prompt file name ``cat``) under ``cc101_dir``."""
    path = Path(spec)
    if path.is_file():
        return PromptSource(path.stem, read_templates(path))
    if spec == TOY:
        if toy_concept is None:
            raise ValueError("prompts=toy needs a toy-world run (its prepare exports a concept)")
        return toy_source(toy_concept)
    root = Path(cc101_dir) if cc101_dir else None
    entry = cc101_entry(spec, root) if root is not None else None
    if entry is None:
        where = f", nor a CustomConcept101 concept in {root}" if root else ""
        raise FileNotFoundError(f"prompts={spec!r}: not a file, not {TOY!r}{where}")
    concept = _ARTICLE.sub("", entry["instance_prompt"].strip())
    targets = (root / entry["instance_data_dir"]).resolve()
    return PromptSource(
        Path(entry["instance_data_dir"]).name,
        read_templates(root / entry["prompt_filename"]),
        concept_phrase=concept,
        class_phrase=entry.get("class_prompt"),
        targets=targets,
    )


def concept_phrases(instance_prompt: str | None, tokens: list[str]) -> tuple[str, str]:
    """``("<new1> triangle", "triangle")`` from ``"a photo of a <new1> triangle"``.

    The concept phrase runs from the first placeholder token to the end; the class phrase is it
    without the tokens. Without a token, both are the prompt minus "a photo of a".
    """
    if not instance_prompt:
        raise ValueError("the run has no instance prompt: set concept_phrase and class_phrase")
    text = " ".join(instance_prompt.split())
    starts = [text.find(t) for t in tokens if t in text]
    if not starts:
        phrase = _ARTICLE.sub("", text)
        return phrase, phrase
    phrase = text[min(starts) :]
    cls = phrase
    for t in tokens:
        cls = cls.replace(t, " ")
    return phrase, " ".join(cls.split())


def expand(source: PromptSource, concept: str, cls: str) -> list[Prompt]:
    """Fill the templates: ``{}`` with the concept phrase (sampled) or class phrase (scored)."""

    def fill(t: str, phrase: str) -> str:
        return " ".join(t.replace("{class}", cls).replace("{}", phrase).split())

    kinds = source.kinds or tuple(kind_of(t) for t in source.templates)
    return [
        Prompt(t, fill(t, concept), fill(t, cls), k)
        for t, k in zip(source.templates, kinds, strict=True)
    ]
