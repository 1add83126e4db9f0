"""Shared sampling loop for the epsilon-parameterised latent diffusion model.

Every sampler (DDIM, PLMS, DDPM-ancestral) walks a descending subset of the
training timesteps and differs only in how one step turns ``(x_t, eps)`` into
``x_prev``. This module owns everything else so the samplers stay small:

* timestep spacing ("leading" spacing as in CompVis / diffusers),
* classifier-free guidance evaluated in ONE batched model call,
* ``step_hooks`` that may edit the latent before each model call (and may use
  autograd, e.g. Attend-and-Excite), a per-step ``callback`` and a tqdm bar,
* seeded noise: x_T and every per-step noise draw come from one
  ``torch.Generator`` in a fixed order, so a seed reproduces a run bit for bit.

Noise order contract (relied on by the parity tests): ``x_T`` (only when not
given) is drawn first, then each stochastic step draws exactly one standard
normal tensor of the latent shape, after its model evaluation(s): DDIM with
eta > 0 at every step, DDPM at every step but the last, PLMS never.

The model is duck-typed (see :class:`EpsModel`); the samplers never import
``ddpm.py``.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

#: ``hook(x, t, info) -> x`` with x (B,C,H,W), t LongTensor (B,); see :meth:`Sampler.sample`.
StepHook = Callable[[Tensor, Tensor, dict[str, Any]], Tensor]
#: ``callback(i, x, x0_pred)`` called after step ``i`` with the new latent.
StepCallback = Callable[[int, Tensor, Tensor], None]
#: ``eps_fn(x, t) -> eps``: the (guided) noise prediction used inside one step.
EpsFn = Callable[[Tensor, Tensor], Tensor]


class EpsModel(Protocol):
    """What the samplers need from ``LatentDiffusion`` (or a test fake)."""

    num_timesteps: int
    alphas_cumprod: Tensor  # (T,)

    def apply_model(self, x_noisy: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """Predict eps (B,C,H,W) for x_noisy (B,C,H,W), t (B,), cond (B,L,D)."""
        ...


def leading_timesteps(num_train_timesteps: int, steps: int, steps_offset: int = 1) -> Tensor:
    """Descending "leading" timesteps ``arange(0, T, T // steps)[:steps] + offset``.

    This is CompVis' ``make_ddim_timesteps(..., "uniform")`` and diffusers'
    ``timestep_spacing="leading"``. Returns a LongTensor of shape (steps,).
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    ratio = num_train_timesteps // steps
    ts = torch.arange(steps, dtype=torch.long) * ratio + steps_offset
    if int(ts[-1]) >= num_train_timesteps:
        # e.g. steps == T with offset 1 would ask for t == T (CompVis/diffusers crash here)
        raise ValueError(
            f"steps={steps} with steps_offset={steps_offset} needs timestep {int(ts[-1])} "
            f">= num_train_timesteps={num_train_timesteps}; use steps_offset=0"
        )
    return ts.flip(0)


def randn(
    shape: Sequence[int],
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """Standard normal noise, drawn on the generator's device then moved.

    Drawing in float32 on the generator's device keeps a seed reproducible
    whatever device/dtype the latent lives on (a CPU generator cannot draw CUDA
    tensors directly).
    """
    gen_device = generator.device if generator is not None else device
    noise = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


def _match_batch(c: Tensor, batch: int, what: str) -> Tensor:
    """Broadcast a batch-1 conditioning to ``batch`` rows; reject other mismatches."""
    if c.shape[0] == batch:
        return c
    if c.shape[0] == 1:
        return c.expand(batch, *c.shape[1:])
    raise ValueError(f"{what} has batch {c.shape[0]}, latent batch is {batch}")


def guided_eps(
    model: EpsModel,
    x: Tensor,
    t: Tensor,
    cond: Tensor,
    uncond: Tensor | None,
    guidance_scale: float,
) -> Tensor:
    """Classifier-free guided eps ``eps_u + s * (eps_c - eps_u)``.

    The unconditional and conditional branches share ONE model call on a
    (2B, C, H, W) batch ordered ``[uncond, cond]``. With ``uncond is None`` or
    ``guidance_scale == 1`` (where the formula reduces to eps_c) the model is
    called once on the B conditional rows only.
    """
    if uncond is None or guidance_scale == 1.0:
        return model.apply_model(x, t, cond)
    x_in = torch.cat([x, x])  # (2B, C, H, W)
    t_in = torch.cat([t, t])  # (2B,)
    c_in = torch.cat([uncond, cond])  # (2B, L, D)
    eps_u, eps_c = model.apply_model(x_in, t_in, c_in).chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)


class Sampler(ABC):
    """Base class: the sampling loop; subclasses implement one step.

    Args:
        model: an :class:`EpsModel`.
        steps_offset: added to the leading-spaced timesteps; ``None`` takes the
            sampler's default (1 for DDIM/PLMS as in SD v1's scheduler config).
    """

    name: ClassVar[str] = "base"
    default_steps_offset: ClassVar[int] = 1

    def __init__(self, model: EpsModel, *, steps_offset: int | None = None) -> None:
        self.model = model
        self.steps_offset = self.default_steps_offset if steps_offset is None else steps_offset

    @property
    def num_train_timesteps(self) -> int:
        return int(self.model.num_timesteps)

    def alphas_cumprod64(self) -> Tensor:
        """The model's alphas_cumprod (T,) as float64 on CPU, for exact coefficient math."""
        return self.model.alphas_cumprod.detach().to("cpu", torch.float64)

    def timesteps(self, steps: int) -> Tensor:
        """Descending LongTensor (steps,) of the training timesteps visited."""
        return leading_timesteps(self.num_train_timesteps, steps, self.steps_offset)

    def _default_shape(self) -> tuple[int, int, int]:
        channels = getattr(self.model, "channels", None)
        size = getattr(self.model, "image_size", None)
        if channels is None or size is None:
            raise ValueError("pass shape=(C, H, W) or x_T (model has no channels/image_size)")
        return int(channels), int(size), int(size)

    @abstractmethod
    def _begin(self, timesteps: list[int], **kw: Any) -> dict[str, Any]:
        """Validate sampler options and return the per-run state (coefficient tables...)."""

    @abstractmethod
    def _step(
        self,
        x: Tensor,
        i: int,
        t: Tensor,
        eps_fn: EpsFn,
        state: dict[str, Any],
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        """One update from x at ``timesteps[i]`` (t: (B,)); returns ``(x_prev, x0_pred)``."""

    def sample(
        self,
        cond: Tensor,
        *,
        uncond: Tensor | None = None,
        steps: int = 50,
        guidance_scale: float = 7.5,
        shape: tuple[int, int, int] | None = None,
        x_T: Tensor | None = None,
        generator: torch.Generator | None = None,
        step_hooks: Sequence[StepHook] = (),
        callback: StepCallback | None = None,
        progress: bool = True,
        **kw: Any,
    ) -> Tensor:
        """Run the reverse process and return the final latent z0 (B, C, H, W).

        Args:
            cond: conditioning (B, L, D), e.g. ``model.get_learned_conditioning(prompts)``.
            uncond: unconditional / negative-prompt embeddings (B or 1, L, D); ``None``
                disables guidance.
            steps: number of sampling steps.
            guidance_scale: CFG scale ``s`` in ``eps_u + s * (eps_c - eps_u)``.
            shape: latent (C, H, W); needed unless ``x_T`` is given (falls back to
                ``model.channels`` / ``model.image_size``).
            x_T: starting latent (B, C, H, W); drawn from ``generator`` if ``None``.
            generator: source of all randomness (x_T, then per-step noise).
            step_hooks: ``hook(x, t, info) -> x`` run in order before each step's model
                call, outside ``torch.no_grad()`` (hooks may use autograd). ``info`` has
                ``i``, ``num_steps``, ``timesteps``, ``cond``, ``uncond``,
                ``guidance_scale``, ``model``, ``sampler``.
            callback: ``callback(i, x_prev, x0_pred)`` after each step.
            progress: show a tqdm bar.
            **kw: sampler options (``eta`` for DDIM).
        """
        ts = self.timesteps(steps).tolist()
        state = self._begin(ts, **kw)

        if x_T is None:
            c, h, w = shape if shape is not None else self._default_shape()
            # Latents take the conditioning's dtype (fp16 models get fp16 latents).
            dtype = cond.dtype if cond.is_floating_point() else torch.float32
            x = randn((cond.shape[0], c, h, w), generator, cond.device, dtype)
        else:
            x = x_T
        batch = x.shape[0]
        cond = _match_batch(cond, batch, "cond")
        if uncond is not None:
            uncond = _match_batch(uncond, batch, "uncond")

        def eps_fn(x_in: Tensor, t_in: Tensor) -> Tensor:
            return guided_eps(self.model, x_in, t_in, cond, uncond, guidance_scale)

        logger.info(
            "%s sampling: %d steps, batch %d, guidance %.2f, options %s",
            self.name,
            len(ts),
            batch,
            guidance_scale,
            kw,
        )
        for i, t_int in enumerate(tqdm(ts, desc=f"{self.name} sampler", disable=not progress)):
            t = torch.full((batch,), t_int, dtype=torch.long, device=x.device)
            if step_hooks:
                info: dict[str, Any] = {
                    "i": i,
                    "num_steps": len(ts),
                    "timesteps": ts,
                    "cond": cond,
                    "uncond": uncond,
                    "guidance_scale": guidance_scale,
                    "model": self.model,
                    "sampler": self,
                }
                for hook in step_hooks:
                    x = hook(x, t, info)
                    if not isinstance(x, Tensor) or x.shape[0] != batch:
                        raise TypeError(f"step hook {hook!r} must return the latent tensor")
            # Only the model evaluation and update are gradient-free; hooks above are not.
            with torch.no_grad():
                x, x0_pred = self._step(x, i, t, eps_fn, state, generator)
            if callback is not None:
                callback(i, x, x0_pred)
        return x


def make_sampler(name: str, model: EpsModel, **kwargs: Any) -> Sampler:
    """Build a sampler by name: ``"ddim"``, ``"plms"`` or ``"ddpm"`` (alias ``"ancestral"``).

    ``kwargs`` go to the sampler's constructor (e.g. ``steps_offset``).
    """
    # Imported here: the sampler modules import this one.
    from ldm.models.diffusion.ancestral import AncestralSampler
    from ldm.models.diffusion.ddim import DDIMSampler
    from ldm.models.diffusion.plms import PLMSSampler

    registry: dict[str, type[Sampler]] = {
        "ddim": DDIMSampler,
        "plms": PLMSSampler,
        "ddpm": AncestralSampler,
        "ancestral": AncestralSampler,
    }
    key = name.lower()
    if key not in registry:
        raise ValueError(f"unknown sampler {name!r}; choose from {sorted(registry)}")
    return registry[key](model, **kwargs)
