"""A delta from a full fine-tuned checkpoint (the reference ``src/get_deltas.py``).

The checkpoint is a Lightning ``.ckpt`` (read without running code: ``state_dict`` plus its
``global_step``) or a full ``.safetensors``. Kept: the UNet tensors of the ``freeze_model``
selection (``auto``: all of ``attn2`` if any ``to_q`` / ``to_out`` differs from the base, else
``to_k`` / ``to_v``) and the new token rows -- our ``placeholder_weight``, or the rows of the
token table past the base vocabulary (the reference appends ``<new1>``, ... there). Every other
tensor must equal the base's: UNet tensors that differ are reported (and left out); a differing
VAE or text encoder means another base, which is refused unless forced.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from custom.base import base_hash
from custom.delta import DeltaMismatchError, make_metadata
from custom.formats import ROWS, Delta, reference_tokens
from custom.model import FREEZE_MODELS
from ldm.checkpoint import DEFAULT_IGNORE, PICKLE_SUFFIXES, load_pickle, load_state_dict
from ldm.convert import TEXT_PREFIX, UNET_PREFIX

log = logging.getLogger(__name__)

TABLE = f"{TEXT_PREFIX}text_model.embeddings.token_embedding.weight"
_IGNORED = re.compile("|".join(DEFAULT_IGNORE))  # keys that never identify a base


def read_full_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], int]:
    """``(state dict, global_step)`` of a full checkpoint (step 0 when it records none)."""
    path = Path(path)
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        return load_state_dict(path), 0
    obj = load_pickle(path)
    sd = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: no state dict in the checkpoint")
    step = obj.get("global_step", 0) if isinstance(obj, Mapping) else 0
    tensors = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    return tensors, int(step) if isinstance(step, int) else 0


def token_rows(full: Mapping[str, Tensor], base: Mapping[str, Tensor]) -> Tensor | None:
    """The new tokens' rows of a full checkpoint, or None."""
    if ROWS in full:
        return full[ROWS]
    n_base = base[TABLE].shape[0]
    if TABLE in full and full[TABLE].shape[0] > n_base:
        return full[TABLE][n_base:]
    return None


def _differs(a: Tensor, b: Tensor) -> bool:
    return a.shape != b.shape or not torch.equal(a, b.to(a.dtype))


def select_keys(full: Mapping[str, Tensor], base: Mapping[str, Tensor], mode: str) -> list[str]:
    """The UNet keys of ``freeze_model`` ``mode`` (``auto``: see the module docstring)."""
    if mode == "auto":
        kv = re.compile(FREEZE_MODELS["crossattn_kv"])
        attn2 = re.compile(FREEZE_MODELS["crossattn"])
        rest = [k for k in full if attn2.search(k) and not kv.search(k) and k in base]
        mode = "crossattn" if any(_differs(full[k], base[k]) for k in rest) else "crossattn_kv"
    pattern = re.compile(FREEZE_MODELS[mode.replace("-", "_")])
    return sorted(k for k in full if k.startswith(UNET_PREFIX) and pattern.search(k))


def extract(
    full: Mapping[str, Tensor],
    base: nn.Module,
    freeze_model: str = "auto",
    tokens: Sequence[str] | None = None,
    step: int = 0,
    force: bool = False,
    **fields: Any,
) -> Delta:
    """The delta of a full fine-tuned state dict ``full`` against the ``base`` model."""
    if freeze_model != "auto" and freeze_model.replace("-", "_") not in FREEZE_MODELS:
        raise ValueError(f"freeze_model must be auto or one of {sorted(FREEZE_MODELS)}")
    own = base.state_dict()
    keys = select_keys(full, own, freeze_model)
    if not keys:
        raise ValueError("no cross-attention weights in the checkpoint (not an SD UNet?)")
    bad = [k for k in keys if k not in own or own[k].shape != full[k].shape]
    if bad:
        raise DeltaMismatchError(f"{len(bad)} tensors do not fit the base (e.g. {bad[0]})")
    mode = "crossattn" if any(".attn2.to_q." in k for k in keys) else "crossattn_kv"
    frozen = [
        k for k in own if k in full and k not in keys and k != TABLE and not _IGNORED.search(k)
    ]
    changed = [k for k in frozen if _differs(full[k], own[k])]
    changed_unet = [k for k in changed if k.startswith(UNET_PREFIX)]
    others = [k for k in changed if not k.startswith(UNET_PREFIX)]
    if TABLE in full and _differs(full[TABLE][: own[TABLE].shape[0]], own[TABLE]):
        others.append(TABLE)
    if others or len(frozen) < len(own) // 2:
        msg = (
            f"the checkpoint was not fine-tuned from this base: {len(others)} frozen tensors "
            f"differ (e.g. {others[0]})"
            if others
            else f"the checkpoint shares only {len(frozen)} of the base's {len(own)} tensors"
        )
        if not force:
            raise DeltaMismatchError(f"{msg} (use --force to extract anyway)")
        log.warning("%s; extracting anyway (forced)", msg)
    if changed_unet:
        log.warning(
            "%d other UNet tensors differ from the base and are not in the delta (e.g. %s)",
            len(changed_unet),
            changed_unet[0],
        )
    tensors = {k: full[k].detach().clone() for k in keys}
    rows = token_rows(full, own)
    names: list[str] = []
    if rows is not None:
        tensors[ROWS] = rows.detach().clone()
        names = list(tokens) if tokens else reference_tokens(rows.shape[0])
        if len(names) != rows.shape[0]:
            raise ValueError(f"{rows.shape[0]} token rows but {len(names)} tokens {names}")
    elif tokens:
        raise ValueError(f"tokens {list(tokens)} given but the checkpoint has no new token rows")
    meta = make_metadata(
        base_hash(base, tensors), names, "custom_diffusion", step, freeze_model=mode, **fields
    )
    log.info("extracted %d tensors (%s), tokens %s, step %d", len(keys), mode, names, step)
    return Delta(tensors, names, meta)
