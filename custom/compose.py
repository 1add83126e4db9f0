"""Merging deltas in closed form (the reference ``src/composenW.py``, paper section 3.2).

For every cross-attention K/V matrix with base value W0 (d, D)::

    minimise  || C_reg W^T - C_reg W0^T ||_F   subject to   C_tgt W^T = V_tgt

C_reg (N, D) are the base text encoder's token features of regularization captions (the first
``n_reg``; positions after the start token up to and including the first end token, and the
first three after it too when the caption begins with "photo of a"): W must act on ordinary
text as W0 does. C_tgt (M, D) are the features of each concept's prompts "<tok> category" and
"a photo of <tok> category" ("painting in the style of ..." for an ``art`` category), and row j
of V_tgt is ``W_i c_j`` with W_i the matrix of the delta concept i came from: W must map each
concept's own words exactly as its fine-tuned model does. Rows shared between concepts (the
causal encoder gives "a photo of" the same features in every prompt) are kept once, for the
first concept. ``target_padding`` k > 0 (not the reference) also constrains the first k
positions after each target prompt's end token: the padding, whose features under a causal
encoder summarise the whole prompt and, on the toy base, carry the concept. With
G = C_reg^T C_reg and P = C_tgt G^-1 (Lagrange multipliers)::

    W = W0 + (V_tgt^T - W0 C_tgt^T) (P C_tgt^T)^-1 P

solved in float64. The report gives, per concept and layer, the relative residual of its kept
constraints (~0 when solvable) and of all its target rows (> 0 where a shared row conflicts),
and how much the regularization outputs moved.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from custom.delta import make_metadata
from custom.formats import ROWS, Delta
from custom.model import FREEZE_MODELS
from ldm.checkpoint import fingerprint
from ldm.convert import UNET_PREFIX
from ldm.modules.tokens import add_placeholder_tokens, placeholder_embedding

log = logging.getLogger(__name__)

N_REG = 200  # the reference uses the first 200 regularization captions
KV = re.compile(FREEZE_MODELS["crossattn_kv"])


def feature_start(caption: str) -> int:
    """First token position kept: after the start token, and after "photo of a" (reference)."""
    return 4 if "photo of a" in caption[:15] else 1


def token_features(
    embedder: nn.Module, prompts: Sequence[str], batch: int = 32, padding: int = 0
) -> list[Tensor]:
    """Per prompt, the (n_i, D) last-hidden-state rows from :func:`feature_start` to the first
    end token (inclusive) and ``padding`` positions more, in float64."""
    eos = embedder.tokenizer.eos_token_id
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            chunk = list(prompts[i : i + batch])
            ids = embedder.tokenize(chunk)
            hidden = embedder.encode_ids(ids).double().cpu()
            for p, row_ids, h in zip(chunk, ids, hidden, strict=True):
                end = int((row_ids == eos).nonzero()[0]) if (row_ids == eos).any() else len(ids)
                out.append(h[feature_start(p) : end + 1 + padding])
    return out


def target_prompts(token: str, category: str, templates: Sequence[str] | None = None) -> list[str]:
    """The reference's two prompts per concept (a word ``art`` switches to the style form), or
    ``templates`` with ``{}`` = "<token> <category>" (e.g. "a photo of a {}")."""
    if templates:
        return [t.format(f"{token} {category}") for t in templates]
    if re.search(r"\bart\b", category):
        return [f"{token} {category}", f"painting in the style of {token} {category}"]
    return [f"{token} {category}", f"a photo of {token} {category}"]


def unique_rows(rows: Tensor, owners: Sequence[int], rtol: float = 1e-6) -> tuple[Tensor, list]:
    """``rows`` without (near-)repeats, the first occurrence kept, and their owners."""
    keep: list[int] = []
    for i in range(rows.shape[0]):
        scale = rows[i].norm() * rtol + 1e-12
        if all((rows[i] - rows[j]).norm() > scale for j in keep):
            keep.append(i)
    return rows[keep], [owners[i] for i in keep]


def solve(w0: Tensor, c_reg: Tensor, c_tgt: Tensor, v_tgt: Tensor, rcond: float = 1e-10) -> Tensor:
    """The constrained least-squares W (d, D) of the module docstring (float64).

    G^-1 is a pseudo-inverse dropping eigenvalues below ``rcond`` x the largest: features that
    all pass through one LayerNorm can span less than D dimensions (a random encoder's do), and
    W is then left as W0 along the directions no feature reaches.
    """
    w0, c_reg, c_tgt, v_tgt = (t.double() for t in (w0, c_reg, c_tgt, v_tgt))
    evals, evecs = torch.linalg.eigh(c_reg.T @ c_reg)
    keep = evals > rcond * evals.max()
    if not keep.all():
        log.info("regularization features span %d of %d dimensions", int(keep.sum()), len(keep))
    p = c_tgt @ (evecs[:, keep] / evals[keep]) @ evecs[:, keep].T  # (M, D) = C_tgt G^-1
    a = p @ c_tgt.T  # (M, M)
    rhs = v_tgt.T - w0 @ c_tgt.T  # (d, M)
    try:
        coef = torch.linalg.solve(a.T, rhs.T).T  # rhs @ a^-1
    except RuntimeError:
        log.warning("target features are linearly dependent: constraints met in least squares")
        coef = rhs @ torch.linalg.pinv(a)
    return w0 + coef @ p


def _rel(err: Tensor, ref: Tensor) -> float:
    return float(err.norm() / ref.norm().clamp_min(1e-30))


def compose(
    deltas: Sequence[Delta],
    base: nn.Module,
    categories: Sequence[str],
    reg_captions: Sequence[str],
    n_reg: int = N_REG,
    templates: Sequence[str] | None = None,
    target_padding: int = 0,
    **fields: Any,
) -> tuple[Delta, dict[str, Any]]:
    """Merge full-valued ``deltas`` (their tokens in order, one category per token) on
    ``base``; returns the merged delta and the residual report. ``templates`` replace the
    reference's target prompts (:func:`target_prompts`): the causal text encoder gives a token
    other features after another prefix, and only the constrained rows are kept exactly.
    ``target_padding``: see the module docstring."""
    if target_padding < 0:
        raise ValueError(f"target_padding must be >= 0, got {target_padding}")
    tokens = [t for d in deltas for t in d.tokens]
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"the deltas' tokens repeat ({tokens}): rename them (--tokens)")
    if len(categories) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens {tokens} but {len(categories)} categories")
    for d in deltas:
        other = [k for k in d.tensors if k != ROWS and not KV.search(k)]
        if other:
            raise ValueError(f"compose merges K/V only; a delta also has {other[0]} (crossattn)")
    captions = [c.strip() for c in reg_captions if c.strip()][:n_reg]
    if not captions:
        raise ValueError("no regularization captions")
    embedder = copy.deepcopy(base.cond_stage_model)
    add_placeholder_tokens(embedder, tokens)
    with torch.no_grad():
        rows = torch.cat([d.tensors[ROWS] for d in deltas])
        placeholder_embedding(embedder).placeholder_weight.copy_(rows)
    c_reg = torch.cat(token_features(embedder, captions))
    owner_of = [i for i, d in enumerate(deltas) for _ in d.tokens]
    per_token = [
        torch.cat(token_features(embedder, target_prompts(t, c, templates), padding=target_padding))
        for t, c in zip(tokens, categories, strict=True)
    ]
    all_rows = torch.cat(per_token)
    all_owners = [j for j, f in enumerate(per_token) for _ in range(f.shape[0])]
    c_tgt, owners = unique_rows(all_rows, all_owners)
    log.info("composing: %d regularization rows, %d target rows (%d unique)",
             c_reg.shape[0], all_rows.shape[0], c_tgt.shape[0])  # fmt: skip
    own = base.state_dict()
    keys = sorted({k for d in deltas for k in d.tensors if KV.search(k)})
    merged: dict[str, Tensor] = {}
    layers: dict[str, Any] = {}
    for key in keys:
        w0 = own[key].double().cpu()
        ws = [d.tensors[key].double() if key in d.tensors else w0 for d in deltas]
        v_tgt = torch.stack([ws[owner_of[j]] @ c for j, c in zip(owners, c_tgt, strict=True)])
        w = solve(w0, c_reg, c_tgt, v_tgt)
        merged[key] = w.to(own[key].dtype)
        w = merged[key].double()  # residuals of what is stored
        entry: dict[str, Any] = {"reg_rel_change": _rel(c_reg @ (w - w0).T, c_reg @ w0.T)}
        for j, tok in enumerate(tokens):
            mine = torch.tensor([o == j for o in owners])
            wi = ws[owner_of[j]]
            kept = c_tgt[mine]
            entry[tok] = {
                "constraints": _rel(kept @ w.T - kept @ wi.T, kept @ wi.T),
                "all_targets": _rel(per_token[j] @ w.T - per_token[j] @ wi.T, per_token[j] @ wi.T),
            }
        layers[key[len(UNET_PREFIX) :]] = entry
    merged[ROWS] = rows.clone()
    report = {
        "tokens": tokens,
        "categories": list(categories),
        "target_prompts": {
            t: target_prompts(t, c, templates) for t, c in zip(tokens, categories, strict=True)
        },
        "target_padding": target_padding,
        "n_reg_captions": len(captions),
        "n_reg_rows": c_reg.shape[0],
        "n_target_rows": all_rows.shape[0],
        "n_constraints": c_tgt.shape[0],
        "max_constraint_residual": {
            t: max(e[t]["constraints"] for e in layers.values()) for t in tokens
        },
        "max_target_residual": {
            t: max(e[t]["all_targets"] for e in layers.values()) for t in tokens
        },
        "max_reg_rel_change": max(e["reg_rel_change"] for e in layers.values()),
        "layers": layers,
    }
    meta = make_metadata(
        fingerprint(own, exclude=merged), tokens, "custom_diffusion", 0,
        freeze_model="crossattn_kv", **fields,
    )  # fmt: skip
    return Delta(merged, tokens, meta), report


def format_report(report: Mapping[str, Any]) -> str:
    """A few lines for the terminal."""
    lines = [
        f"composed {len(report['tokens'])} concepts from {report['n_reg_captions']} "
        f"regularization captions ({report['n_constraints']} constraints, "
        f"{len(report['layers'])} layers)",
    ]
    for t, c in zip(report["tokens"], report["categories"], strict=True):
        lines.append(
            f"  {t} ({c}): max relative residual {report['max_constraint_residual'][t]:.2e} "
            f"on its constraints, {report['max_target_residual'][t]:.2e} on all its targets"
        )
    lines.append(f"  regularization outputs moved by at most {report['max_reg_rel_change']:.2e}")
    return "\n".join(lines)
