"""ViCo's new pieces: the image cross-attention block, the Otsu object mask, the regularizer.

* :class:`ImageCrossAttention` is a full ``BasicTransformerBlock(dim, 8, dim // 8)`` without a
  text context (self-attention, cross-attention whose keys and values are the reference image's
  tokens, GEGLU feed-forward, three pre-LayerNorms and residuals), as the reference builds it:
  20 d^2 + 17 d parameters, PyTorch's default init (not zero), parameter names those of SD's
  blocks. Only its cross-attention takes a key mask; the reference tokens are not normalised.
* :func:`otsu_mask` is the reference's 10-level Otsu threshold on the min-max normalised map,
  vectorised over the batch (same grid, same first-argmax and ``>=`` rule).
* :func:`attention_regularizer` is the MSE between the max-normalised ``*`` and end-token maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.modules.attention import BasicTransformerBlock

#: Heads of every image block (the reference: 8 heads of ``dim // 8``).
IMAGE_HEADS = 8
#: Candidate thresholds of the reference Otsu: 0, 0.1, ..., 0.9 on the normalised map.
OTSU_LEVELS = 10


class ImageCrossAttention(BasicTransformerBlock):
    """Attention from the generated image's tokens to the reference image's tokens.

    ``forward(x, context, mask)``: x (B, N, C) the generated image's tokens, context (B, M, C)
    the reference's (same width), mask (B, M) bool: reference tokens that may be attended.
    """

    def __init__(self, dim: int, n_heads: int = IMAGE_HEADS, dropout: float = 0.0) -> None:
        if dim % n_heads:
            raise ValueError(f"image block width {dim} is not divisible by {n_heads} heads")
        super().__init__(dim, n_heads, dim // n_heads, context_dim=None, dropout=dropout)

    def forward(  # type: ignore[override]
        self, x: Tensor, context: Tensor, mask: Tensor | None = None
    ) -> Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context, mask=mask) + x
        return self.ff(self.norm3(x)) + x


def otsu_mask(v: Tensor, levels: int = OTSU_LEVELS) -> Tensor:
    """Object mask (B, P) bool of attention maps ``v`` (B, P), as the reference thresholds them.

    Each map is min-max normalised; for every candidate tau in {0, 1/levels, ...} the values
    split into ``< tau`` and ``>= tau`` and the between-class variance ``w_lo w_hi (mu_lo -
    mu_hi)^2`` is scored; the first tau with the largest positive score wins (an empty class
    never wins; 0 if none is positive) and the mask is ``v_hat >= tau``. A constant map (the
    reference divides 0 by 0) is all True.
    """
    v = v.detach().float()
    lo, hi = v.amin(1, keepdim=True), v.amax(1, keepdim=True)
    span = hi - lo
    vhat = (v - lo) / span.clamp_min(torch.finfo(v.dtype).tiny)  # (B, P)
    taus = torch.arange(levels, device=v.device, dtype=v.dtype) / levels  # (L,)
    below = vhat.unsqueeze(1) < taus.view(1, -1, 1)  # (B, L, P)
    n_lo = below.sum(-1).to(v.dtype)  # (B, L)
    n_hi = v.shape[1] - n_lo
    s_lo = (vhat.unsqueeze(1) * below).sum(-1)
    s_hi = vhat.sum(1, keepdim=True) - s_lo
    mu_lo, mu_hi = s_lo / n_lo, s_hi / n_hi  # NaN for an empty class
    g = (n_lo / v.shape[1]) * (n_hi / v.shape[1]) * (mu_lo - mu_hi) ** 2
    g = torch.nan_to_num(g, nan=0.0)
    best = g.argmax(1)  # first maximum
    tau = torch.where(g.amax(1) > 0, taus[best], torch.zeros_like(taus[best]))
    mask = vhat >= tau.unsqueeze(1)
    return mask | (span <= 0)


def max_normalize(v: Tensor) -> Tensor:
    """(B, P) maps divided by their own maximum over P."""
    return v / v.amax(1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)


def attention_regularizer(a_token: Tensor, a_eot: Tensor) -> Tensor:
    """MSE (mean over batch and patches) of the max-normalised ``*`` map against the detached,
    max-normalised end-token map, both (B, P)."""
    return F.mse_loss(max_normalize(a_token.float()), max_normalize(a_eot.detach().float()))
