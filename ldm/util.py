"""Small helpers shared by the core: CompVis-style ``target/params`` instantiation and counting."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def get_obj_from_str(path: str) -> Any:
    """Import ``package.module.Name`` and return ``Name``."""
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"not a dotted import path: {path!r}")
    return getattr(importlib.import_module(module), name)


def instantiate_from_config(config: Mapping[str, Any], **extra: Any) -> Any:
    """Build an object from a CompVis ``{target: ..., params: {...}}`` mapping."""
    if "target" not in config:
        raise KeyError(f"expected a 'target' key in {dict(config)!r}")
    params = dict(config.get("params") or {})
    params.update(extra)
    return get_obj_from_str(config["target"])(**params)


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (CompVis initialises residual outputs at zero)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
