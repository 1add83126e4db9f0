"""Custom Diffusion deltas: what a run trained, in a small ``.safetensors`` with metadata.

A delta holds the trained tensors under their model state-dict keys, with full values like the
reference's ``delta_epoch=*.ckpt`` (``model.diffusion_model.*.attn2.to_k.weight`` ... and the
token rows ``cond_stage_model.transformer.text_model.embeddings.token_embedding.placeholder_weight``
(n_tokens, D)). The header metadata (all strings) records:

``delta_format``  version of this layout
``method``        e.g. ``custom_diffusion``
``base_hash``     :func:`ldm.checkpoint.fingerprint` of the frozen weights it was trained on
                  (every base tensor except the delta's own keys)
``tokens``        JSON list of the placeholder tokens, in row order
``step``          optimizer steps trained
plus method fields such as ``freeze_model``.

:func:`apply_delta` refuses a delta trained on another base unless forced. It also takes the
compressed deltas of :mod:`custom.compress` (low-rank factors of the difference from the base),
which it expands against the model's own weights first.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm.checkpoint import load_state_dict, read_metadata, save_state_dict
from ldm.modules.tokens import add_placeholder_tokens, placeholder_tokens

log = logging.getLogger(__name__)

DELTA_FORMAT = "1"


class DeltaMismatchError(ValueError):
    """A delta that does not belong to the model it is applied to."""


def make_metadata(
    base_hash: str, tokens: Iterable[str], method: str, step: int = 0, **fields: Any
) -> dict[str, str]:
    """Header metadata of a delta (all strings)."""
    return {
        "delta_format": DELTA_FORMAT,
        "method": method,
        "base_hash": base_hash,
        "tokens": json.dumps(list(tokens)),
        "step": str(int(step)),
        **{k: str(v) for k, v in fields.items()},
    }


def delta_metadata(
    model: nn.Module, keys: Iterable[str], method: str, **fields: Any
) -> dict[str, str]:
    """Header metadata of a delta holding ``keys`` of ``model``."""
    fields.setdefault("step", getattr(model, "global_step", 0))
    return make_metadata(
        model.weights_fingerprint(exclude=keys),
        placeholder_tokens(model.cond_stage_model),
        method,
        **fields,
    )


def save_delta(model: nn.Module, path: str | Path) -> Path:
    """Write ``model.export_state_dict()`` with ``model.export_metadata()`` to ``path``."""
    path = Path(path)
    save_state_dict(model.export_state_dict(), path, metadata=model.export_metadata())
    return path


def load_delta(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a delta file; raises ``ValueError`` for other checkpoints."""
    meta = read_metadata(path)
    if "base_hash" not in meta or "delta_format" not in meta:
        raise ValueError(f"{path}: not a delta (no delta metadata in its header)")
    if meta["delta_format"] != DELTA_FORMAT:
        raise ValueError(f"{path}: delta format {meta['delta_format']}, expected {DELTA_FORMAT}")
    return load_state_dict(path), meta


def _add_tokens(model: nn.Module, tokens: list[str], where: str) -> None:
    have = placeholder_tokens(model.cond_stage_model)
    if have != tokens[: len(have)]:
        raise DeltaMismatchError(f"{where}: model has placeholder tokens {have}, delta {tokens}")
    if len(tokens) > len(have):
        add_placeholder_tokens(model.cond_stage_model, tokens[len(have) :])


def apply_delta(
    model: nn.Module,
    delta: str | Path | tuple[Mapping[str, Tensor], Mapping[str, str]],
    force: bool = False,
) -> dict[str, str]:
    """Add the delta's tokens to ``model`` and copy its tensors in; returns its metadata.

    Raises:
        DeltaMismatchError: the delta was trained on another base (unless ``force``), its tokens
            clash with the model's, or its tensors do not fit the model.
    """
    from custom.compress import expand, model_keys  # compress imports this module

    where = str(delta) if isinstance(delta, str | Path) else "delta"
    tensors, meta = load_delta(delta) if isinstance(delta, str | Path) else delta
    found = model.weights_fingerprint(exclude=model_keys(tensors))
    if found != meta["base_hash"]:
        msg = f"{where}: trained on base {meta['base_hash']}, this model is {found}"
        if not force:
            raise DeltaMismatchError(f"{msg} (pass force=True, or force_delta=true to sample.py)")
        log.warning("%s; applying anyway (forced)", msg)
    try:
        tensors = expand(tensors, meta, model.state_dict(), force=force)
    except DeltaMismatchError as exc:
        raise DeltaMismatchError(f"{where}: {exc}") from None
    _add_tokens(model, json.loads(meta.get("tokens", "[]")), where)
    own = model.state_dict(keep_vars=True)
    bad = [k for k, v in tensors.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise DeltaMismatchError(f"{where}: {len(bad)} tensors do not fit this model ({bad[0]})")
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)
    log.info(
        "applied %s delta %s: %d tensors, tokens %s, %s steps",
        meta.get("method", "?"),
        where,
        len(tensors),
        meta.get("tokens"),
        meta.get("step"),
    )
    return dict(meta)
