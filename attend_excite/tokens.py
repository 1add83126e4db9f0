"""Which prompt tokens to excite: chosen by word (every BPE piece) or by index.

Indices count CLIP's start-of-text token as 0, as in the reference and diffusers, so in
"a cat and a dog" the subjects are ``[2, 5]``. A word is looked up as the exact sequence of BPE
pieces the tokenizer gives it on its own: CLIP splits text into words before BPE, so a word has the
same pieces in any prompt. A made-up word yields several pieces and every one is excited (the
reference excites only what it is told; its issue #19 reports no effect when a 4-piece identity
word was given as one index). An added placeholder such as ``<new1>`` is one piece.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from ldm.modules.encoders.clip import PromptTooLongError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenSelection:
    """The tokens to excite in one prompt.

    Attributes:
        prompt: the prompt text.
        indices: token positions (start token = 0), ascending.
        pieces: the BPE piece at each index (e.g. ``"cat</w>"``).
        words: the word (or ``"#<index>"`` for a given index) each index came from.
        n_tokens: prompt length in tokens, start and end tokens included.
    """

    prompt: str
    indices: tuple[int, ...]
    pieces: tuple[str, ...]
    words: tuple[str, ...]
    n_tokens: int

    def labels(self) -> list[str]:
        """Readable token names for logs and figures (``cat``, ``zor|bla|x``)."""
        return [p.removesuffix("</w>") for p in self.pieces]


def prompt_ids(tokenizer, prompt: str, max_length: int = 77) -> list[int]:
    """Token ids of ``prompt`` with start and end tokens, unpadded; refuses over-long prompts."""
    ids = list(tokenizer(prompt).input_ids)
    if len(ids) > max_length:
        raise PromptTooLongError(
            f"prompt has {len(ids)} tokens (start and end included), more than the text "
            f"encoder's {max_length}; Attend-and-Excite refuses it because the truncated tokens "
            f"would silently be ignored: shorten {prompt[:60]!r}..."
        )
    return ids


def describe_tokens(tokenizer, prompt: str) -> dict[int, str]:
    """``{index: piece}`` of the prompt's own tokens (start/end tokens left out)."""
    ids = list(tokenizer(prompt).input_ids)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    return {i: pieces[i] for i in range(1, len(ids) - 1)}


def find_word(ids: Sequence[int], pieces: Sequence[int]) -> list[int]:
    """Every position of ``ids`` covered by an occurrence of the id sequence ``pieces``."""
    n = len(pieces)
    found: list[int] = []
    for start in range(len(ids) - n + 1):
        if list(ids[start : start + n]) == list(pieces):
            found += range(start, start + n)
    return found


def select_tokens(
    tokenizer,
    prompt: str,
    words: Sequence[str] = (),
    token_indices: Sequence[int] = (),
    max_length: int = 77,
) -> TokenSelection:
    """Resolve ``words`` (all their pieces, all occurrences) and ``token_indices`` in ``prompt``.

    Raises:
        PromptTooLongError: the prompt has more than ``max_length`` tokens.
        ValueError: a word is not in the prompt, an index is not one of the prompt's own tokens,
            or nothing was selected.
    """
    ids = prompt_ids(tokenizer, prompt, max_length)
    chosen: dict[int, str] = {}
    for word in words:
        word = str(word)
        pieces = list(tokenizer(word, add_special_tokens=False).input_ids)
        if not pieces:
            raise ValueError(f"word {word!r} has no tokens")
        found = find_word(ids, pieces)
        if not found:
            names = tokenizer.convert_ids_to_tokens(pieces)
            raise ValueError(
                f"word {word!r} (BPE pieces {names}) is not in the prompt {prompt!r}, whose tokens "
                f"are {describe_tokens(tokenizer, prompt)}"
            )
        if len(pieces) > 1:
            log.info("word %r is %d BPE pieces; exciting each of them", word, len(pieces))
        for i in found:
            chosen.setdefault(i, word)
    for index in token_indices:
        index = int(index)
        if not 0 < index < len(ids) - 1:
            raise ValueError(
                f"token index {index} is not a token of the prompt {prompt!r} (start token = 0); "
                f"choose from {describe_tokens(tokenizer, prompt)}"
            )
        chosen.setdefault(index, f"#{index}")
    if not chosen:
        raise ValueError("Attend-and-Excite needs tokens: give words=[...] or token_indices=[...]")
    order = sorted(chosen)
    names = tokenizer.convert_ids_to_tokens([ids[i] for i in order])
    return TokenSelection(
        prompt=prompt,
        indices=tuple(order),
        pieces=tuple(names),
        words=tuple(chosen[i] for i in order),
        n_tokens=len(ids),
    )
