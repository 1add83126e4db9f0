"""Prompts -> images with any sampler: the one generation path of ``sample.py`` and callbacks."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ldm.models.diffusion.sampling import make_sampler
from ldm.modules.attention import caching_context_kv


def initial_noise(shape: tuple[int, ...], seeds: Sequence[int], device, dtype) -> Tensor:
    """One x_T per seed, so an image depends on its seed only, not on the batch it is in."""
    noise = [
        torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float32)
        for s in seeds
    ]
    return torch.stack(noise).to(device=device, dtype=dtype)


def generate(
    model,
    prompts: Sequence[str],
    *,
    negative_prompt: str | Sequence[str] = "",
    sampler: str = "ddim",
    steps: int = 50,
    guidance_scale: float = 7.5,
    eta: float = 0.0,
    seed: int = 0,
    step_hooks: Sequence[Callable] = (),
    callback: Callable | None = None,
    progress: bool = True,
) -> Tensor:
    """Sample one image per prompt (image i uses seed ``seed + i``): (B, 3, H, W) in [0, 1]."""
    prompts = list(prompts)
    negatives = (
        [negative_prompt] * len(prompts)
        if isinstance(negative_prompt, str)
        else list(negative_prompt)
    )
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    with torch.no_grad():
        cond = model.get_learned_conditioning(prompts)
        uncond = model.get_learned_conditioning(negatives) if guidance_scale != 1.0 else None
    shape = (model.channels, model.image_size, model.image_size)
    x_T = initial_noise(shape, [seed + i for i in range(len(prompts))], cond.device, cond.dtype)
    kwargs = {"eta": eta} if sampler == "ddim" else {}
    with caching_context_kv(model.model):
        z = make_sampler(sampler, model).sample(
            cond,
            uncond=uncond,
            steps=steps,
            guidance_scale=guidance_scale,
            x_T=x_T,
            generator=torch.Generator().manual_seed(seed),
            step_hooks=step_hooks,
            callback=callback,
            progress=progress,
            **kwargs,
        )
    with torch.no_grad():
        return ((model.decode_first_stage(z) + 1) / 2).clamp(0, 1)
