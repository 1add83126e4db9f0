"""Caption grammar of the toy world, and its inverse.

Object phrases (``{a}`` is "a" or "an" by the next word's first letter):

- plain: ``{a} {colour} {shape}``                      "a red circle"
- stripes: ``{a} {colour} {shape} with {second} stripes``  "a red triangle with yellow stripes"
- dots: ``{a} {colour} {shape} with {second} dots``        "a blue square with orange dots"
- outline: ``an outlined {colour} {shape}``            "an outlined red square"
- twotone: ``{a} {colour} and {second} {shape}``       "a red and yellow ring" (left, right)
- class word only: ``{a} {shape}``                     "a triangle" (colour and pattern dropped)

A scene caption joins its object phrases as "X", "X and Y" or "X, Y and Z" (no Oxford comma) and
puts the result in a template, "a photo of {}" or bare "{}". Object order in a caption is the
scene's drawing order and says nothing about position. :func:`parse_caption` inverts the grammar.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from toyworld.world import COLOURS, SHAPES, ObjectSpec

TEMPLATES: tuple[str, ...] = ("a photo of {}", "{}")

# (shape, colour, pattern, pattern_colour); colour and pattern are None for a class-word phrase.
Attributes = tuple[str, str | None, str | None, str | None]


def article(word: str) -> str:
    """Indefinite article for ``word`` ("an orange", "a red")."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def with_article(phrase: str) -> str:
    """Prefix ``phrase`` with its indefinite article."""
    return f"{article(phrase)} {phrase}"


def object_phrase(obj: ObjectSpec, class_word_only: bool = False) -> str:
    """Noun phrase for one object, with its article."""
    if class_word_only:
        return with_article(obj.shape)
    if obj.pattern == "plain":
        return with_article(f"{obj.colour} {obj.shape}")
    if obj.pattern in ("stripes", "dots"):
        return with_article(f"{obj.colour} {obj.shape} with {obj.pattern_colour} {obj.pattern}")
    if obj.pattern == "outline":
        return with_article(f"outlined {obj.colour} {obj.shape}")
    if obj.pattern == "twotone":
        return with_article(f"{obj.colour} and {obj.pattern_colour} {obj.shape}")
    raise ValueError(f"no phrase for pattern {obj.pattern!r}")


def join_phrases(phrases: Sequence[str]) -> str:
    """Join object phrases: "X", "X and Y" or "X, Y and Z"."""
    if not phrases:
        raise ValueError("a caption needs at least one object")
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(
    objects: Sequence[ObjectSpec], template: str = "{}", class_word_only: bool = False
) -> str:
    """Caption for a scene; ``class_word_only`` drops colours and patterns of every object."""
    return template.format(join_phrases([object_phrase(o, class_word_only) for o in objects]))


_C = "|".join(COLOURS)
_S = "|".join(SHAPES)
_PHRASES: tuple[tuple[str, str], ...] = (
    (rf"(?P<colour>{_C}) (?P<shape>{_S})", "plain"),
    (rf"(?P<colour>{_C}) (?P<shape>{_S}) with (?P<second>{_C}) stripes", "stripes"),
    (rf"(?P<colour>{_C}) (?P<shape>{_S}) with (?P<second>{_C}) dots", "dots"),
    (rf"outlined (?P<colour>{_C}) (?P<shape>{_S})", "outline"),
    (rf"(?P<colour>{_C}) and (?P<second>{_C}) (?P<shape>{_S})", "twotone"),
    (rf"(?P<shape>{_S})", "class"),
)
_PHRASE_RES = tuple((re.compile(rf"^an? {body}$"), pattern) for body, pattern in _PHRASES)
# Phrase boundaries: ", a ..." or " and a ..." (the "and" inside "red and yellow" has no article).
_SPLIT = re.compile(r",\s+(?=an? )|\s+and\s+(?=an? )")


def parse_phrase(phrase: str) -> Attributes:
    """``(shape, colour, pattern, pattern_colour)`` of one object phrase."""
    for regex, pattern in _PHRASE_RES:
        m = regex.match(phrase.strip())
        if m:
            groups = m.groupdict()
            if pattern == "class":
                return (groups["shape"], None, None, None)
            return (groups["shape"], groups["colour"], pattern, groups.get("second"))
    raise ValueError(f"not a toy-world object phrase: {phrase!r}")


def parse_caption(text: str) -> list[Attributes]:
    """Objects of a caption in order, as ``(shape, colour, pattern, pattern_colour)`` tuples."""
    body = text.strip()
    for template in TEMPLATES:
        prefix = template.split("{}")[0]
        if prefix and body.startswith(prefix):
            body = body[len(prefix) :]
            break
    return [parse_phrase(p) for p in _SPLIT.split(body)]
