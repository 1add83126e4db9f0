"""The Cross Initialization regularizer: an L2 tie of the learned tokens to their initial vectors.

``reg_weight * mean_k ||v_k - v0_k||_2``: the plain (not squared) Euclidean distance of each token
from its initial vector, averaged over the tokens. As in the reference it is computed with
``F.pairwise_distance``, which adds ``eps`` (1e-6) to the difference inside the norm, so the
gradient stays finite at ``v = v0`` (the first step).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

REG_EPS = 1e-6  # F.pairwise_distance's default, as the reference uses it


def l2_tie(v: Tensor, v0: Tensor, eps: float = REG_EPS) -> Tensor:
    """``mean_k ||v_k - v0_k + eps||_2`` for rows ``v``, ``v0`` of shape (n, D)."""
    if v.shape != v0.shape:
        raise ValueError(f"tokens {tuple(v.shape)} and initial vectors {tuple(v0.shape)} differ")
    return F.pairwise_distance(v, v0.to(v), eps=eps).mean()
