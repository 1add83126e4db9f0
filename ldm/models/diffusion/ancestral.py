"""DDPM ancestral sampler over a strided subset of timesteps (respaced DDPM).

Visiting timesteps t_0 > t_1 > ... > t_{S-1}, each step treats
(t_i -> t_{i+1}) as one forward step of a respaced chain with

    beta'_i = 1 - abar(t_i) / abar(t_{i+1}),      abar(after last) = 1,

and samples the Gaussian posterior q(x_prev | x_t, x0_pred) (Ho et al. 2020,
eq. 6-7) with the "fixed small" variance beta~ = (1 - abar') / (1 - abar) beta'.
The last step lands on abar = 1, i.e. returns x0_pred with no noise.

Default timesteps are leading-spaced with ``steps_offset = 0``
(``arange(0, T, T // S)``): with ``steps = T`` this is exactly plain DDPM over
999..0, and it equals diffusers' ``DDPMScheduler`` (``variance_type=
"fixed_small"``, ``timestep_spacing="leading"``, ``steps_offset=0``) step for step.
``steps_offset=1`` (SD's DDIM grid) is allowed for ``steps < T``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from ldm.models.diffusion.sampling import EpsFn, Sampler, randn

logger = logging.getLogger(__name__)


class AncestralSampler(Sampler):
    """Respaced DDPM ancestral sampling.

    Option ``eta`` is accepted and ignored (ancestral sampling is always fully
    stochastic, i.e. DDIM's eta = 1), so a generic caller may pass its configured eta.
    """

    name = "DDPM"
    default_steps_offset = 0

    def make_schedule(self, steps: int) -> dict[str, Tensor]:
        """Per-step float64 coefficient tables (S,) for ``steps`` steps."""
        return self._schedule_for(self.timesteps(steps).tolist())

    def _schedule_for(self, ts: list[int]) -> dict[str, Tensor]:
        ac = self.alphas_cumprod64()
        a_t = ac[ts]
        a_prev = torch.cat([a_t[1:], torch.ones(1, dtype=torch.float64)])
        beta = 1 - a_t / a_prev  # respaced beta'
        return {
            "sqrt_a": a_t.sqrt(),
            "sqrt_1ma": (1 - a_t).sqrt(),
            # posterior mean = coef_x0 * x0 + coef_xt * x_t
            "coef_x0": a_prev.sqrt() * beta / (1 - a_t),
            "coef_xt": (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t),
            "std": ((1 - a_prev) / (1 - a_t) * beta).sqrt(),  # 0 at the last step
        }

    def ancestral_step(
        self, x: Tensor, eps: Tensor, index: int, coefs: dict[str, Tensor], noise: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """One posterior draw from step ``index``; ``noise`` (B,C,H,W) unused at the last step.

        Returns ``(x_prev, x0_pred)``, both (B, C, H, W).
        """
        x0 = (x - float(coefs["sqrt_1ma"][index]) * eps) / float(coefs["sqrt_a"][index])
        mean = float(coefs["coef_x0"][index]) * x0 + float(coefs["coef_xt"][index]) * x
        std = float(coefs["std"][index])
        if std == 0.0:
            return mean, x0
        if noise is None:
            raise ValueError("ancestral_step needs `noise` before the last step")
        return mean + std * noise, x0

    def _begin(self, timesteps: list[int], **kw: Any) -> dict[str, Any]:
        eta = kw.pop("eta", None)
        if eta is not None and float(eta) not in (0.0, 1.0):
            logger.warning("AncestralSampler ignores eta=%s (it always samples with eta=1)", eta)
        if kw:
            raise TypeError(f"AncestralSampler got unexpected options {sorted(kw)}")
        return {"coefs": self._schedule_for(timesteps), "num_steps": len(timesteps)}

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
        # Every step but the last (whose variance is 0) draws one noise tensor.
        if i + 1 < state["num_steps"]:
            noise = randn(x.shape, generator, x.device, x.dtype)
        return self.ancestral_step(x, eps, i, state["coefs"], noise)
