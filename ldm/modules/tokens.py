"""Placeholder tokens (``<new1>``, ...) for personalization methods.

:func:`add_placeholder_tokens` adds tokens to the CLIP tokenizer of a
:class:`~ldm.modules.encoders.FrozenCLIPEmbedder` and gives them embedding rows initialised from
explicit CLIP token ids (the reference code copies rows by id, e.g. 42170 ``ktn`` and 47629
``pll``; resolve a word with ``tokenizer.convert_tokens_to_ids("cat</w>")``).

The rows live in their own small parameter, ``placeholder_weight`` (n_new, D), of a
:class:`PlaceholderEmbedding` that replaces the text encoder's token embedding:

* the pretrained table keeps its key, shape and ``requires_grad`` (frozen for SD), so base
  checkpoints load unchanged and no optimizer step (weight decay included) can touch its rows;
* only ``placeholder_weight`` is trained and saved: its optimizer state is a few rows, not the
  49408 x 768 table the reference registers as trainable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Attribute (and state-dict key suffix) of the placeholder rows.
PLACEHOLDER_PARAM = "placeholder_weight"


class PlaceholderEmbedding(nn.Embedding):
    """A token embedding whose ids past the base vocabulary index ``placeholder_weight``.

    ``weight`` is the base table (the same parameter object as before); ``tokens`` lists the
    placeholder tokens in row order.
    """

    def __init__(self, base: nn.Embedding) -> None:
        num, dim = base.weight.shape
        super().__init__(
            num,
            dim,
            padding_idx=base.padding_idx,
            _weight=base.weight.detach(),
            _freeze=not base.weight.requires_grad,
        )
        self.weight = base.weight  # the same parameter: optimizers and checkpoints still see it
        self.tokens: list[str] = []
        self.placeholder_weight = nn.Parameter(base.weight.new_zeros(0, dim))

    @property
    def num_base(self) -> int:
        return self.weight.shape[0]

    def add_rows(self, rows: Tensor, tokens: Sequence[str]) -> None:
        """Append rows (n, D) for ``tokens``; the parameter is replaced, so build optimizers
        after adding tokens."""
        old = self.placeholder_weight
        new = torch.cat([old.detach(), rows.to(old)], dim=0)
        self.placeholder_weight = nn.Parameter(new, requires_grad=old.requires_grad)
        self.tokens += list(tokens)

    def forward(self, ids: Tensor) -> Tensor:
        is_new = ids >= self.num_base
        out = F.embedding(ids.masked_fill(is_new, 0), self.weight, self.padding_idx)
        # Gradients reach only the rows of the placeholder positions (where() masks the rest).
        extra = F.embedding((ids - self.num_base).clamp_min(0), self.placeholder_weight)
        return torch.where(is_new.unsqueeze(-1), extra, out)

    def extra_repr(self) -> str:
        return f"{self.num_base} + {len(self.tokens)} placeholder rows, {self.embedding_dim}"


def placeholder_embedding(embedder: nn.Module) -> PlaceholderEmbedding | None:
    """The embedder's :class:`PlaceholderEmbedding`, or None if it has no placeholder tokens."""
    emb = embedder.token_embedding
    return emb if isinstance(emb, PlaceholderEmbedding) else None


def placeholder_tokens(embedder: nn.Module) -> list[str]:
    """Tokens added with :func:`add_placeholder_tokens`, in row order."""
    emb = placeholder_embedding(embedder)
    return list(emb.tokens) if emb is not None else []


def _check_new(tokenizer, tokens: Sequence[str]) -> None:
    vocab = tokenizer.get_vocab()
    for tok in tokens:
        if not tok or tok != tok.strip() or any(c.isspace() for c in tok):
            raise ValueError(f"placeholder token {tok!r} must be a non-empty word without spaces")
        for form in (tok, f"{tok}</w>"):
            if form in vocab:
                raise ValueError(
                    f"token {tok!r} already exists in the vocabulary (id {vocab[form]})"
                )
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"placeholder tokens repeat: {list(tokens)}")


def _init_rows(
    emb: PlaceholderEmbedding, tokens: Sequence[str], init_ids: Sequence[Sequence[int] | int] | None
) -> Tensor:
    dim = emb.embedding_dim
    if init_ids is None:
        return emb.weight.new_zeros(len(tokens), dim)
    if len(init_ids) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(init_ids)} initializer id lists")
    rows = []
    for tok, ids in zip(tokens, init_ids, strict=True):
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < emb.num_base]
        if not ids or bad:
            raise ValueError(
                f"initializer ids for {tok!r} must be base vocabulary ids in [0, {emb.num_base})"
                f", got {ids}"
            )
        rows.append(emb.weight.detach()[ids].mean(0))
    return torch.stack(rows)


def add_placeholder_tokens(
    embedder: nn.Module,
    tokens: Sequence[str],
    init_ids: Sequence[Sequence[int] | int] | None = None,
) -> list[int]:
    """Add ``tokens`` to ``embedder``'s tokenizer with trainable embedding rows.

    Args:
        embedder: a ``FrozenCLIPEmbedder`` (``tokenizer`` and ``token_embedding``).
        tokens: new tokens such as ``["<new1>", "<new2>"]``; one that already exists in the
            vocabulary is refused with a ``ValueError``.
        init_ids: per token, the CLIP token ids whose rows' mean initialises its row (or one
            id). ``None`` leaves zero rows, for loading trained rows next.

    Returns:
        The token ids of ``tokens``.
    """
    tokens = list(tokens)
    tokenizer = embedder.tokenizer
    _check_new(tokenizer, tokens)
    emb = placeholder_embedding(embedder)
    if emb is None:
        emb = PlaceholderEmbedding(embedder.token_embedding)
        embedder.transformer.text_model.embeddings.token_embedding = emb
    first = emb.num_base + len(emb.tokens)
    if len(tokenizer) != first:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the embedding {first} rows; "
            "add tokens only through add_placeholder_tokens"
        )
    rows = _init_rows(emb, tokens, init_ids)
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if ids != list(range(first, first + len(tokens))):
        raise RuntimeError(f"unexpected ids {ids} for new tokens {tokens}")
    emb.add_rows(rows, tokens)
    return ids
