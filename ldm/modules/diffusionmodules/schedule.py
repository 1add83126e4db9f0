"""The DDPM noise schedule and the twelve buffers SD v1 checkpoints store, computed as CompVis does
(float64 math, stored as float32, ``v_posterior`` 0)."""

from __future__ import annotations

import numpy as np
import torch

DDPM_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
)  # fmt: skip


def make_beta_schedule(
    schedule: str, timesteps: int, linear_start: float, linear_end: float
) -> np.ndarray:
    """CompVis "linear" is linear in sqrt(beta) (diffusers' ``scaled_linear``); float64."""
    if schedule == "linear":
        return np.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=np.float64) ** 2
    if schedule == "linear_beta":
        return np.linspace(linear_start, linear_end, timesteps, dtype=np.float64)
    raise ValueError(f"unknown beta schedule {schedule!r} (use 'linear' or 'linear_beta')")


def ddpm_schedule_buffers(
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    timesteps: int = 1000,
    beta_schedule: str = "linear",
) -> dict[str, torch.Tensor]:
    """The named buffers of :data:`DDPM_BUFFERS`, float32."""
    b = make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end)
    ac = np.cumprod(1.0 - b)
    prev = np.append(1.0, ac[:-1])
    var = b * (1.0 - prev) / (1.0 - ac)
    values = (
        b,
        ac,
        prev,
        np.sqrt(ac),
        np.sqrt(1.0 - ac),
        np.log(1.0 - ac),
        np.sqrt(1.0 / ac),
        np.sqrt(1.0 / ac - 1),
        var,
        np.log(np.maximum(var, 1e-20)),
        b * np.sqrt(prev) / (1.0 - ac),
        (1.0 - prev) * np.sqrt(1.0 - b) / (1.0 - ac),
    )
    return {
        k: torch.tensor(v, dtype=torch.float32) for k, v in zip(DDPM_BUFFERS, values, strict=True)
    }
