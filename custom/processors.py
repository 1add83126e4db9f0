"""The Custom Diffusion attention processor: default attention, start token's K/V detached.

In every cross-attention layer the keys and values of context position 0 (CLIP's start-of-text
token, identical for every prompt) are cut from the graph while training, so fine-tuning cannot
move them: the reference code does this in both its CompVis and diffusers versions, and its
authors report a small improvement. Outputs are unchanged; only gradients differ.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.modules.attention import AttnProcessor, CrossAttention


def detach_start_token(t: Tensor) -> Tensor:
    """(B, H, N, D) with position 0 of N detached."""
    return torch.cat([t[:, :, :1].detach(), t[:, :, 1:]], dim=2)


class CustomDiffusionProcessor(AttnProcessor):
    """:class:`AttnProcessor`; in training, cross-attention K/V at position 0 get no gradient."""

    def project(
        self, attn: CrossAttention, x: Tensor, context: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = super().project(attn, x, context)
        if context is not None and attn.training and torch.is_grad_enabled():
            k, v = detach_start_token(k), detach_start_token(v)
        return q, k, v


def cross_attention_factory(name: str, module: CrossAttention) -> CustomDiffusionProcessor | None:
    """For :func:`~ldm.modules.attention.set_attn_processor`: every cross-attention layer."""
    return CustomDiffusionProcessor() if module.is_cross else None
