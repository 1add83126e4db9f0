"""DDIM sampler (Song et al. 2021, eq. 12 / 16) for the eps-parameterised LDM.

Matches SD v1.5's scheduler configuration as used by CompVis and diffusers'
``DDIMScheduler``: leading timestep spacing with ``steps_offset = 1``, the last
step lands on ``alphas_cumprod[0]`` (``set_alpha_to_one = False``), and x0 is
not clipped. One step, with a = alphas_cumprod[t], a' = the next visited level::

    x0    = (x - sqrt(1 - a) * eps) / sqrt(a)
    sigma = eta * sqrt((1 - a') / (1 - a) * (1 - a / a'))
    x'    = sqrt(a') * x0 + sqrt(1 - a' - sigma^2) * eps + sigma * z,   z ~ N(0, I)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ldm.models.diffusion.sampling import EpsFn, Sampler, randn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DDIMSchedule:
    """Per-step DDIM coefficients, all float64 tensors of shape (S,) on CPU."""

    timesteps: list[int]  # descending, length S
    alphas: Tensor  # alphas_cumprod at timesteps[i]
    alphas_prev: Tensor  # alphas_cumprod of the level step i lands on
    sigmas: Tensor  # eta-scaled DDIM noise std

    def __len__(self) -> int:
        return len(self.timesteps)


class DDIMSampler(Sampler):
    """Deterministic (eta = 0) or stochastic DDIM sampling; option ``eta``."""

    name = "DDIM"

    def make_schedule(self, steps: int, eta: float = 0.0) -> DDIMSchedule:
        """Coefficients for ``steps`` leading-spaced steps with noise scale ``eta``."""
        ts = self.timesteps(steps).tolist()
        return self._schedule_for(ts, eta)

    def _schedule_for(self, ts: list[int], eta: float) -> DDIMSchedule:
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        ac = self.alphas_cumprod64()
        alphas = ac[ts]
        # Step i lands on timesteps[i + 1]; the last one on alphas_cumprod[0]
        # (set_alpha_to_one=False), not on 1.
        alphas_prev = torch.cat([alphas[1:], ac[:1]])
        sigmas = eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)).sqrt()
        return DDIMSchedule(ts, alphas, alphas_prev, sigmas)

    @staticmethod
    def ddim_step(
        x: Tensor,
        eps: Tensor,
        index: int,
        schedule: DDIMSchedule,
        noise: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One DDIM update from ``schedule.timesteps[index]``.

        Args:
            x: current latent x_t (B, C, H, W).
            eps: noise prediction at (x, t) (B, C, H, W).
            index: position in ``schedule.timesteps`` (0 = noisiest).
            schedule: from :meth:`make_schedule`.
            noise: standard normal (B, C, H, W), required when the step's sigma > 0
                (diffusers' ``variance_noise``).

        Returns:
            ``(x_prev, x0_pred)``, both (B, C, H, W).
        """
        a_t = float(schedule.alphas[index])
        a_prev = float(schedule.alphas_prev[index])
        sigma = float(schedule.sigmas[index])
        x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
        # "direction pointing to x_t"; max() guards a tiny negative from rounding
        dir_xt = math.sqrt(max(1.0 - a_prev - sigma * sigma, 0.0)) * eps
        x_prev = math.sqrt(a_prev) * x0 + dir_xt
        if sigma > 0:
            if noise is None:
                raise ValueError("ddim_step with eta > 0 needs `noise`")
            x_prev = x_prev + sigma * noise
        return x_prev, x0

    def _begin(self, timesteps: list[int], **kw: Any) -> dict[str, Any]:
        eta = float(kw.pop("eta", 0.0))
        if kw:
            raise TypeError(f"{type(self).__name__} got unexpected options {sorted(kw)}")
        return {"schedule": self._schedule_for(timesteps, eta), "eta": eta}

    def _step(
        self,
        x: Tensor,
        i: int,
        t: Tensor,
        eps_fn: EpsFn,
        state: dict[str, Any],
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        eps = eps_fn(x, t)
        noise = None
        # Draw whenever eta > 0 (as diffusers does) so the noise order is fixed.
        if state["eta"] > 0:
            noise = randn(x.shape, generator, x.device, x.dtype)
        return self.ddim_step(x, eps, i, state["schedule"], noise)
