"""Frozen weights in low precision: half the memory, and bf16/fp16 kernels, for what never trains.

Fine-tuning methods train a few tensors (Custom Diffusion: the cross-attention K/V and a token
row) and backpropagate through a frozen UNet. ``cast_frozen(castable(model, dtype), dtype)``
stores every frozen weight in bf16 (or fp16) and leaves the trainable ones, and all normalisation
layers, in fp32; the model then runs its forward passes under ``torch.autocast``
(:func:`autocast_for`), so the trainable fp32 tensors are cast per operation and receive fp32
gradients. This is what diffusers' training
examples do with ``--mixed_precision``; on CPUs with AMX-BF16 it is also several times faster.

Normalisation layers stay fp32: autocast runs ``group_norm``/``layer_norm`` in fp32 and would
refuse bf16 affine parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
NORMS = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)


def fast_bf16() -> bool:
    """Whether this machine runs bf16 natively: a bf16 GPU, or a CPU with AVX512-BF16/AMX."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    mkldnn = torch.backends.mkldnn.is_available()
    return bool(mkldnn and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``"bf16"``/``"fp16"`` -> a dtype; ``None``/``"fp32"`` -> None (everything stays fp32);
    ``"auto"`` -> bf16 where :func:`fast_bf16`, else None."""
    if name == "auto":
        return torch.bfloat16 if fast_bf16() else None
    if name in (None, "fp32", "32"):
        return None
    if name not in DTYPES:
        raise ValueError(f"frozen_dtype must be auto, fp32, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def castable(module: nn.Module, dtype: torch.dtype) -> dict[str, nn.Parameter]:
    """The parameters to cast, by state-dict name: frozen, floating, not yet ``dtype``, outside
    norm layers."""
    out = {}
    for prefix, sub in module.named_modules():
        if isinstance(sub, NORMS):
            continue
        for name, p in sub.named_parameters(prefix=prefix, recurse=False):
            if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                out[name] = p
    return out


def cast_frozen(params: Mapping[str, nn.Parameter], dtype: torch.dtype) -> None:
    """Cast ``params`` (from :func:`castable`) to ``dtype`` in place."""
    for p in params.values():
        p.data = p.data.to(dtype)


def autocast_for(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """Autocast to ``dtype`` on ``device``'s type; a no-op context for ``None``."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)
