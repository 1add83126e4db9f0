"""PLMS sampler: CompVis' pseudo linear multistep method (Liu et al. 2022, PNDM).

The update is the deterministic DDIM step (eta = 0) applied with a
*combined* eps instead of the raw model output. With e_k the raw predictions at
the visited timesteps (e_0 the current one):

* first step: "pseudo improved Euler" (2nd order): take a DDIM step with e_0,
  evaluate the model there at the next timestep (one extra model call) and use
  the average ``(e_0 + e_next) / 2``;
* second step: 2nd-order Adams–Bashforth ``(3 e_0 - e_1) / 2``;
* third step: 3rd order ``(23 e_0 - 16 e_1 + 5 e_2) / 12``;
* afterwards: 4th order ``(55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24``.

The history holds raw model outputs, never the combined ones, as in CompVis.
Timestep spacing and the final level are DDIM's (see ``ddim.py``). Diffusers'
``PNDMScheduler`` orders its warm-up differently, so it is not a parity target.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.sampling import EpsFn

logger = logging.getLogger(__name__)


def plms_combine(eps: Tensor, history: list[Tensor]) -> Tensor:
    """Adams–Bashforth combination of ``eps`` with ``history`` (oldest first, 1..3 items)."""
    if len(history) == 1:
        return (3 * eps - history[-1]) / 2
    if len(history) == 2:
        return (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
    if len(history) >= 3:
        return (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
    raise ValueError("plms_combine needs at least one previous eps")


class PLMSSampler(DDIMSampler):
    """CompVis PLMS; costs ``steps + 1`` model evaluations. ``eta`` must be 0.

    Step hooks run once per step; the extra first-step evaluation (improved
    Euler's corrector) is not a step and does not call them.
    """

    name = "PLMS"

    def _begin(self, timesteps: list[int], **kw: Any) -> dict[str, Any]:
        eta = float(kw.pop("eta", 0.0))
        if eta != 0.0:
            raise ValueError("PLMS is deterministic: eta must be 0")
        if kw:
            raise TypeError(f"PLMSSampler got unexpected options {sorted(kw)}")
        return {"schedule": self._schedule_for(timesteps, 0.0), "history": []}

    def _step(
        self,
        x: Tensor,
        i: int,
        t: Tensor,
        eps_fn: EpsFn,
        state: dict[str, Any],
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        schedule = state["schedule"]
        history: list[Tensor] = state["history"]
        eps = eps_fn(x, t)  # (B, C, H, W)
        if history:
            eps_prime = plms_combine(eps, history)
        elif i + 1 < len(schedule):
            # Pseudo improved Euler: predictor = DDIM step, corrector = model at its landing.
            x_pred, _ = self.ddim_step(x, eps, i, schedule)
            t_next = torch.full_like(t, schedule.timesteps[i + 1])
            eps_prime = (eps + eps_fn(x_pred, t_next)) / 2
        else:
            # A single-step run: there is no next timestep to correct at (CompVis would
            # re-evaluate at the same t); plain DDIM.
            eps_prime = eps
        history.append(eps)
        if len(history) > 3:
            history.pop(0)
        return self.ddim_step(x, eps_prime, i, schedule)
