"""``CustomDiffusion``: LatentDiffusion that trains only cross-attention and new token rows.

Overrides only the base hooks:

* ``install_hooks`` adds the modifier tokens (rows initialised from explicit CLIP ids), freezes
  everything except the UNet parameters selected by :data:`FREEZE_MODELS` and the token rows,
  and installs :class:`~custom.processors.CustomDiffusionProcessor` on every cross-attention;
* ``trainable_parameters`` returns exactly those tensors (AdamW, constant lr in the recipes);
* ``batch_mask`` turns the dataset's image-space mask into the latent loss mask;
* ``export_state_dict`` / ``export_metadata`` give the delta (see :mod:`custom.delta`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch.nn.functional as F
from torch import Tensor, nn

from custom.delta import delta_metadata
from custom.processors import cross_attention_factory
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.modules.attention import set_attn_processor
from ldm.modules.tokens import add_placeholder_tokens, placeholder_embedding

log = logging.getLogger(__name__)

# UNet parameters trained per ``freeze_model`` (names relative to ``model.diffusion_model``).
# SD v1 has no K/V biases, so ``crossattn_kv`` is the 32 ``to_k/to_v`` weights of its 16 blocks.
FREEZE_MODELS: dict[str, str] = {
    "crossattn_kv": r"transformer_blocks\.\d+\.attn2\.to_[kv]\.",
    "crossattn": r"transformer_blocks\.\d+\.attn2\.",
}


def latent_mask(mask: Tensor, size: Sequence[int], margin: int = 0) -> Tensor:
    """Image-space mask (B, H, W) or (B, 1, H, W) -> latent mask (B, 1, h, w).

    A latent cell counts only if every pixel under it is real image (a min-pool), and ``margin``
    more cells are dropped inside the edge of a pasted region, whose latents the grey canvas
    still reaches through the VAE. The reference drops one cell (its ``//8 + 1 : //8 - 1``); this
    rule is the symmetric form of it and leaves all-ones masks all ones.
    """
    m = mask.float()
    if m.dim() == 3:
        m = m[:, None]
    (big_h, big_w), (h, w) = m.shape[-2:], tuple(size)
    if big_h % h or big_w % w:
        raise ValueError(f"mask {big_h}x{big_w} is not a multiple of the latent size {h}x{w}")
    m = -F.max_pool2d(-m, (big_h // h, big_w // w))
    if margin > 0:
        # Padding of max_pool2d is -inf, so the canvas border itself never erodes a mask.
        m = -F.max_pool2d(-m, 2 * margin + 1, stride=1, padding=margin)
    return m


def default_mask_margin(latent_size: int) -> int:
    """The reference's one-cell margin at SD's 64x64 latents, scaled with the latent size.

    Zoomed-out targets are pasted at 1/3 to 0.6 of the image side: 21-38 latent cells on SD, where
    one cell is a thin rim, but only 2-4 cells on the toy base's 8x8 latents, where a one-cell
    margin would leave most of them no loss at all (so 0 there).
    """
    return round(latent_size / 64)


class CustomDiffusion(LatentDiffusion):
    """Custom Diffusion (Kumari et al., CVPR 2023) on the CompVis SD v1 model.

    Args:
        freeze_model: ``crossattn_kv`` trains ``attn2.to_k/to_v``; ``crossattn`` all of ``attn2``
            (the reference's hyphenated spelling is accepted too).
        modifier_tokens: new tokens, e.g. ``["<new1>"]`` (from config).
        initializer_ids: per token, the CLIP ids whose rows initialise it (e.g. ``[[42170]]``).
        mask_margin: latent cells dropped inside the edge of a zoomed-out (pasted) target image;
            ``None``: :func:`default_mask_margin` of the latent size (1 on SD, 0 on the toy).
        token_learning_rate: base rate of the new token rows (scaled like ``learning_rate``);
            ``None``: ``learning_rate``, as the reference trains them.
        **kwargs: ``LatentDiffusion`` arguments (model configs, ``learning_rate``, ``scale_lr``,
            ``optimizer``, ``ckpt`` of the base, ``frozen_dtype``, ...).
    """

    saves_only_trained = True  # deltas: ``frozen_dtype: auto`` may store the base in bf16

    def __init__(
        self,
        *args: Any,
        freeze_model: str = "crossattn_kv",
        modifier_tokens: Sequence[str] = (),
        initializer_ids: Sequence[Sequence[int] | int] | None = None,
        mask_margin: int | None = None,
        token_learning_rate: float | None = None,
        **kwargs: Any,
    ) -> None:
        mode = freeze_model.replace("-", "_")
        if mode not in FREEZE_MODELS:
            raise ValueError(f"freeze_model must be one of {sorted(FREEZE_MODELS)}, got {mode!r}")
        if kwargs.get("cond_stage_trainable"):
            raise ValueError("CustomDiffusion trains only the token rows of the text encoder")
        if modifier_tokens and initializer_ids is None:
            raise ValueError("modifier_tokens need initializer_ids (CLIP ids, one list per token)")
        # Plain attributes read by install_hooks(), which LatentDiffusion.__init__ calls last.
        self.freeze_model = mode
        self.modifier_tokens = list(modifier_tokens)
        self.initializer_ids = None if initializer_ids is None else list(initializer_ids)
        self.token_learning_rate = token_learning_rate
        super().__init__(*args, **kwargs)
        self.mask_margin = (
            default_mask_margin(self.image_size) if mask_margin is None else mask_margin
        )

    def install_hooks(self) -> None:
        if self.modifier_tokens:
            add_placeholder_tokens(
                self.cond_stage_model, self.modifier_tokens, self.initializer_ids
            )
        self.requires_grad_(False)
        pattern = re.compile(FREEZE_MODELS[self.freeze_model])
        for name, p in self.model.diffusion_model.named_parameters():
            if pattern.search(name):
                p.requires_grad_(True)
        rows = placeholder_embedding(self.cond_stage_model)
        if rows is not None:
            rows.placeholder_weight.requires_grad_(True)
        set_attn_processor(self.model.diffusion_model, cross_attention_factory)
        params = self.delta_parameters()
        log.info(
            "Custom Diffusion (%s): %d tensors, %s parameters trainable; tokens %s",
            self.freeze_model,
            len(params),
            f"{sum(p.numel() for p in params.values()):,}",
            self.modifier_tokens,
        )

    def delta_parameters(self) -> dict[str, nn.Parameter]:
        """The trained tensors by state-dict key: selected UNet weights and token rows."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def trainable_parameters(self) -> list[nn.Parameter] | list[dict[str, Any]]:
        params = list(self.delta_parameters().values())
        table = placeholder_embedding(self.cond_stage_model)
        if self.token_learning_rate is None or table is None:
            return params
        rows = table.placeholder_weight
        return [
            {"params": [p for p in params if p is not rows], "lr": self.learning_rate},
            {"params": [rows], "lr": self.token_learning_rate},
        ]

    def batch_mask(self, batch: Mapping[str, Any], z: Tensor) -> Tensor | None:
        mask = batch.get("mask")
        if mask is None:
            return None
        return latent_mask(mask.to(z.device), z.shape[-2:], self.mask_margin)

    def export_state_dict(self) -> dict[str, Tensor]:
        """The delta: trained tensors only (full values, as the reference saves them)."""
        keys = set(self.delta_parameters())
        with self.ema_scope():
            return {k: v.detach().cpu().clone() for k, v in self.state_dict().items() if k in keys}

    def resume_callback(self, source: str, folder: str | Path) -> pl.Callback:
        from custom.resume import ResumeFromDelta

        return ResumeFromDelta(source, folder)

    def export_metadata(self) -> dict[str, str]:
        return delta_metadata(
            self, self.delta_parameters(), method="custom_diffusion", freeze_model=self.freeze_model
        )
