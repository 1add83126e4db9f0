"""The base model a delta belongs to: loading it, its fingerprint, checking a delta against it."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from torch import nn

from custom.compress import expand, is_compressed, model_keys
from custom.delta import DeltaMismatchError
from custom.formats import Delta

log = logging.getLogger(__name__)


def load_base(path: str | Path | None, config: str | Path = "sd15") -> nn.Module:
    """The base ``LatentDiffusion`` of ``config`` with weights ``path`` (None: the config's own
    ``ckpt``), in eval mode on the CPU."""
    from ldm import load_model

    return load_model(path, config=config)


def base_hash(base: nn.Module, keys: Iterable[str]) -> str:
    """The ``base_hash`` a delta holding ``keys`` records for ``base``."""
    return base.weights_fingerprint(exclude=keys)


def check_base(delta: Delta, base: nn.Module, where: str, force: bool = False) -> str:
    """Raise :class:`DeltaMismatchError` (one line) unless ``delta`` was trained on ``base``;
    returns the base's hash. A delta without a recorded base (another tool's file) passes."""
    found = base_hash(base, model_keys(delta.tensors))
    want = delta.meta.get("base_hash")
    if want is not None and want != found:
        msg = f"{where}: trained on base {want}, this base is {found}"
        if not force:
            raise DeltaMismatchError(f"{msg} (use --force to go on)")
        log.warning("%s; going on (forced)", msg)
    return found


def full_values(delta: Delta, base: nn.Module | None, force: bool = False) -> Delta:
    """``delta`` with SVD factors expanded against ``base`` (needed only when compressed)."""
    if not is_compressed(delta.meta):
        return delta
    if base is None:
        raise ValueError("the delta is compressed: give its base (--base / --config)")
    tensors = expand(delta.tensors, delta.meta, base.state_dict(), force=force)
    meta = {k: v for k, v in delta.meta.items() if not k.startswith(("compression", "ranks"))}
    meta.pop("kv_base_hash", None)
    return Delta(tensors, delta.tokens, meta)
