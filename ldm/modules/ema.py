"""Exponential moving average of a module's trainable parameters (CompVis ``LitEma`` layout).

Shadow copies are buffers named like the parameter with the dots removed, plus ``decay`` and
``num_updates``, so a model with EMA saves ``model_ema.*`` keys exactly as ``*-full-ema.ckpt``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class LitEma(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.int))
        self.names = {n: n.replace(".", "") for n, p in model.named_parameters() if p.requires_grad}
        params = dict(model.named_parameters())
        for name, shadow in self.names.items():
            self.register_buffer(shadow, params[name].detach().clone())

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One update after an optimiser step; the warm-up decay of CompVis."""
        self.num_updates += 1
        n = int(self.num_updates)
        decay = min(float(self.decay), (1 + n) / (10 + n))
        buffers = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if name in self.names:
                buffers[self.names[name]].lerp_(p.detach(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        buffers = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if name in self.names:
                p.copy_(buffers[self.names[name]])

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """Run with the EMA weights in ``model``; the trained weights come back afterwards."""
        saved = {n: p.detach().clone() for n, p in model.named_parameters() if n in self.names}
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in saved:
                        p.copy_(saved[name])
