"""The A&E objective on aggregated cross-attention, exactly as the reference computes it.

For one image with aggregated maps ``A`` (h, w, 77):

1. drop the start token and the last slot (``A[..., 1:-1]``; with ``normalize_eot`` the end token
   and all padding, the reference's SD 2.1 option), scale by 100 and softmax over tokens;
2. per chosen token (index shifted by -1), reflect-pad by ``kernel_size // 2`` and convolve with
   the reference's "Gaussian" ``exp(-((d / (2 sigma))^2))`` (for sigma 0.5 its 1-D weights are
   [0.2119, 0.5761, 0.2119], not a true sigma 0.5 Gaussian), then take the maximum;
3. loss = max over tokens of ``max(0, 1 - m)``: only the most neglected token drives the step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def smoothing_kernel(kernel_size: int = 3, sigma: float = 0.5) -> Tensor:
    """The reference's normalised (k, k) kernel (separable, ``exp(-((x - c) / (2 sigma))^2)``)."""
    if kernel_size < 1 or kernel_size % 2 == 0 or sigma <= 0:
        raise ValueError(f"need an odd kernel_size >= 1 and sigma > 0, got {kernel_size}, {sigma}")
    x = torch.arange(kernel_size, dtype=torch.float32) - (kernel_size - 1) / 2
    g = torch.exp(-((x / (2 * sigma)) ** 2))
    k = g[:, None] * g[None, :]
    return k / k.sum()


def token_distribution(
    maps: Tensor, softmax_scale: float = 100.0, n_tokens: int | None = None
) -> Tensor:
    """(h, w, Nk) attention -> (h, w, Nk - 2) softmax over the text tokens (index i -> i - 1).

    ``n_tokens`` (the prompt length with start and end tokens) keeps only the prompt's own words,
    dropping the end token and padding too (the reference's ``sd_2_1`` / normalize-EOT option).
    """
    end = -1 if n_tokens is None else n_tokens - 1
    return F.softmax(maps[:, :, 1:end] * softmax_scale, dim=-1)


def max_attention_per_token(
    maps: Tensor,
    indices: Sequence[int],
    softmax_scale: float = 100.0,
    kernel: Tensor | None = None,
    n_tokens: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Maxima (K,) and the (smoothed) maps (K, h, w) of ``indices`` (start token = 0)."""
    probs = token_distribution(maps, softmax_scale, n_tokens)
    sel = probs[:, :, [i - 1 for i in indices]].permute(2, 0, 1)  # (K, h, w)
    if kernel is not None:
        pad = kernel.shape[-1] // 2
        if pad >= min(sel.shape[-2:]):
            raise ValueError(
                f"a {kernel.shape[-1]}x{kernel.shape[-1]} smoothing kernel needs maps larger than "
                f"{sel.shape[-2]}x{sel.shape[-1]}: use a smaller kernel_size or smooth=false"
            )
        x = F.pad(sel[:, None], (pad,) * 4, mode="reflect")
        sel = F.conv2d(x, kernel.to(x)[None, None])[:, 0]
    return sel.flatten(1).max(dim=1).values, sel


def ae_loss(max_attention: Tensor) -> Tensor:
    """``max_s max(0, 1 - m_s)`` for maxima (K,); a clamped token passes no gradient."""
    gap = 1.0 - max_attention
    return torch.where(gap > 0, gap, torch.zeros_like(gap)).max()


def step_sizes(
    scale_factor: float, num_steps: int, scale_range: Sequence[float] = (1.0, 0.5)
) -> list[float]:
    """``alpha_i = scale_factor * sqrt(linspace(a, b, num_steps)[i])`` (index-based, as the
    reference: 20 falling to ~17.4 at step 24 of 50)."""
    scale = np.linspace(float(scale_range[0]), float(scale_range[1]), num_steps)
    return (scale_factor * np.sqrt(scale)).tolist()
