"""The Cross Initialization rule: new tokens start at text-encoder *outputs*.

For ``n`` new tokens and a list of names (celebrities for faces):

1. tokenise every name without padding; for positions ``k = 1..n`` (the start token is position
   0) collect the input-embedding rows ``E[token_k(name)]`` of the names that have a token there;
2. ``mu_k`` = the mean of column ``k`` (a one-piece name counts in column 1 only; repeated names
   count every time);
3. run ``[BOS, mu_1 .. mu_n, EOS, PAD ...]`` through the whole text encoder (position embeddings,
   causal layers, final LayerNorm) and take its outputs at positions ``1..n``: ``v_k``.

``v_k`` is written into the new tokens' *input* rows ("cross": an output-space vector used as an
input embedding). Step 3 runs the encoder's own forward: ``mu`` is first written into the new
rows and the token ids are encoded, so nothing of the CLIP model is re-implemented here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.modules.tokens import placeholder_embedding

log = logging.getLogger(__name__)

CELEB_NAMES: Path = Path(__file__).with_name("celeb_names.txt")


def load_names(path: str | Path | None = None) -> list[str]:
    """Names, one per line (default: the shipped celebrity list); blank lines are skipped and
    repeated names kept, as the reference's ``splitlines()`` does."""
    path = Path(path) if path is not None else CELEB_NAMES
    if not path.is_file():
        raise FileNotFoundError(f"name list not found: {path}")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"{path}: no names in the file")
    return names


def name_token_ids(tokenizer, names: Sequence[str], n: int) -> list[list[int]]:
    """Per name, the ids of its first ``n`` tokens (no start/end token, no padding)."""
    out = []
    for name in names:
        ids = tokenizer(name, add_special_tokens=False).input_ids[:n]
        if ids:
            out.append(ids)
    if not out:
        raise ValueError("no name has any token")
    return out


def mean_name_embeddings(embedder: nn.Module, names: Sequence[str], n: int) -> Tensor:
    """``mu`` (n, D): per position, the mean input-embedding row over the names with a token
    there. Raises if some position has no name (all names shorter than ``n`` tokens)."""
    table = embedder.token_embedding.weight.detach()
    ids = name_token_ids(embedder.tokenizer, names, n)
    sums = table.new_zeros(n, table.shape[1], dtype=torch.float64)
    counts = [0] * n
    for row in ids:
        for k, i in enumerate(row):
            sums[k] += table[i].double()
            counts[k] += 1
    empty = [k + 1 for k, c in enumerate(counts) if c == 0]
    if empty:
        raise ValueError(f"no name has a token at position(s) {empty}: use fewer tokens")
    log.info("cross init: %d names, tokens per position %s", len(ids), counts)
    return (sums / torch.tensor(counts, dtype=torch.float64)[:, None]).to(table.dtype)


@torch.no_grad()
def encode_rows(embedder: nn.Module, tokens: Sequence[str], rows: Tensor) -> Tensor:
    """The encoder outputs at ``tokens``' positions of ``[BOS, tokens..., EOS, PAD...]`` when the
    tokens' input rows are ``rows`` (n, D); the rows are restored afterwards."""
    emb = placeholder_embedding(embedder)
    if emb is None or not set(tokens) <= set(emb.tokens):
        raise ValueError(f"tokens {list(tokens)} are not placeholder tokens of this encoder")
    tok = embedder.tokenizer
    ids = tok.convert_tokens_to_ids(list(tokens))
    seq = [tok.bos_token_id, *ids, tok.eos_token_id]
    seq += [tok.pad_token_id] * (embedder.max_length - len(seq))
    index = torch.tensor([emb.tokens.index(t) for t in tokens])
    saved = emb.placeholder_weight.detach().clone()
    was_training = embedder.transformer.training
    embedder.transformer.eval()  # no dropout in the init
    try:
        emb.placeholder_weight[index] = rows.to(saved)
        out = embedder.encode_ids(torch.tensor([seq]))[0, 1 : 1 + len(tokens)]
    finally:
        emb.placeholder_weight.copy_(saved)
        embedder.transformer.train(was_training)
    return out.float().to(saved.dtype)


def cross_init_vectors(embedder: nn.Module, tokens: Sequence[str], names: Sequence[str]) -> Tensor:
    """Cross Initialization vectors (n, D) for the placeholder ``tokens`` from ``names``."""
    return encode_rows(embedder, tokens, mean_name_embeddings(embedder, names, len(tokens)))


def word_rows(embedder: nn.Module, words: Sequence[str]) -> Tensor:
    """Classic textual-inversion init: per word, the mean input row of its BPE pieces (n, D)."""
    table = embedder.token_embedding.weight.detach()
    rows = []
    for word in words:
        ids = embedder.tokenizer(word, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"init word {word!r} has no tokens")
        rows.append(table[ids].mean(0))
    return torch.stack(rows)


def random_rows(embedder: nn.Module, n: int, seed: int = 0) -> Tensor:
    """Gaussian rows (n, D) with the per-dimension std of the base table's rows."""
    table = embedder.token_embedding.weight.detach().float()
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, table.shape[1], generator=g) * table.std(0) + table.mean(0)
    return rows.to(embedder.token_embedding.weight.dtype)
