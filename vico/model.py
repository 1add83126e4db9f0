"""``ViCo``: LatentDiffusion with a frozen UNet, image cross-attention blocks and one learned token.

Overrides only the base hooks and CompVis entry points, wrapping (never copying) them:

* ``install_hooks`` adds the placeholder token (its row initialised from the init word's input
  embedding), freezes everything else, builds the image blocks (:mod:`vico.modules`) and
  installs :class:`~vico.hooks.ViCoProcessor` plus the block hooks (:mod:`vico.hooks`);
* ``get_learned_conditioning`` reads the placeholder string (``*``) of prompts as the token;
* ``conditioning`` encodes the batch's reference images into the visual condition;
* ``apply_model`` runs ``[x; z_ref]`` through the UNet when a visual condition is set and
  returns the first half;
* ``extra_losses`` adds the attention regularizer; ``export_state_dict`` holds the token row
  and the image blocks only.

The token gets ``learning_rate`` (scaled by ``scale_lr`` as in the reference), the image blocks a
fixed ``block_lr`` (1e-5 in the reference) as a second AdamW group.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.modules.attention import CrossAttention, set_attn_processor
from ldm.modules.tokens import add_placeholder_tokens, placeholder_embedding
from vico.hooks import (
    BLOCKS,
    ViCoProcessor,
    ViCoState,
    VisualCondition,
    attn2_name,
    image_cross_hook,
    image_cross_layers,
    key_of,
    transformer_block,
)
from vico.modules import ImageCrossAttention

log = logging.getLogger(__name__)

#: Version of the layout written by :meth:`ViCo.export_state_dict` / ``export_metadata``.
VICO_FORMAT = "1"

ImageLike = Tensor | Image.Image | str | Path | Sequence[Image.Image | str | Path]


def internal_token(tokenizer, placeholder: str) -> str:
    """The added token that carries ``placeholder``'s row: the placeholder itself when it is new
    to the vocabulary, else ``<placeholder>`` (``*`` is a CLIP word: prompts keep saying ``*``)."""
    vocab = tokenizer.get_vocab()
    return f"<{placeholder}>" if {placeholder, f"{placeholder}</w>"} & set(vocab) else placeholder


def single_token_id(tokenizer, word: str) -> int:
    """The CLIP id of ``word``, which must be one token (the reference asserts the same)."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"init word {word!r} is {len(ids)} CLIP tokens; use a one-token word")
    return int(ids[0])


def _doubled(cond: Any) -> Any:
    """The text context for ``[x; x_ref]``: every tensor of ``cond`` repeated along the batch."""
    if isinstance(cond, Tensor):
        return torch.cat([cond, cond])
    if isinstance(cond, Mapping):
        return {k: _doubled(v) for k, v in cond.items()}
    if isinstance(cond, list | tuple):
        return [_doubled(c) for c in cond]
    raise TypeError(f"unsupported conditioning {type(cond).__name__}")


class ViCo(LatentDiffusion):
    """ViCo (Hao et al., arXiv:2306.00971) on the CompVis SD v1 model.

    Args:
        placeholder: the string prompts use for the concept (``*``, from config).
        init_word: a one-token word whose input-embedding row initialises the token.
        layers: SpatialTransformers (``output_blocks.N.M``) that get an image block; ``None``
            for the reference placement (:func:`~vico.hooks.image_cross_layers`).
        block_lr: learning rate of the image blocks (not scaled).
        reg_weight: weight of the attention regularizer summed over layers.
        reference_key: batch key of the reference images.
        **kwargs: ``LatentDiffusion`` arguments (model configs, ``learning_rate`` of the token,
            ``scale_lr``, ``optimizer``, ``ckpt`` of the base, ...).
    """

    def __init__(
        self,
        *args: Any,
        placeholder: str = "*",
        init_word: str = "sculpture",
        layers: Sequence[str] | None = None,
        block_lr: float = 1e-5,
        reg_weight: float = 5e-4,
        reference_key: str = "reference",
        **kwargs: Any,
    ) -> None:
        if kwargs.get("cond_stage_trainable"):
            raise ValueError("ViCo trains only the placeholder row of the text encoder")
        if not placeholder or placeholder != placeholder.strip():
            raise ValueError(f"placeholder must be a word without spaces, got {placeholder!r}")
        # Plain attributes read by install_hooks(), which LatentDiffusion.__init__ calls last.
        self.placeholder = placeholder
        self.init_word = init_word
        self.layer_names = list(layers) if layers else None
        self.block_lr = block_lr
        self.reg_weight = reg_weight
        self.reference_key = reference_key
        self.vico_state = ViCoState()
        super().__init__(*args, **kwargs)

    # ---------------------------------------------------------------- setup
    def install_hooks(self) -> None:
        enc = self.cond_stage_model
        self.token = internal_token(enc.tokenizer, self.placeholder)
        init_id = single_token_id(enc.tokenizer, self.init_word)
        (self.token_id,) = add_placeholder_tokens(enc, [self.token], [[init_id]])
        self.requires_grad_(False)
        placeholder_embedding(enc).placeholder_weight.requires_grad_(True)
        unet = self.model.diffusion_model
        self.layer_names = self.layer_names or image_cross_layers(unet)
        blocks = {}
        for layer in self.layer_names:
            width = transformer_block(unet, layer).norm1.normalized_shape[0]
            blocks[key_of(layer)] = ImageCrossAttention(width)
        self.add_module(BLOCKS, nn.ModuleDict(blocks))
        attn2 = {attn2_name(unet, layer): layer for layer in self.layer_names}

        def factory(name: str, module: CrossAttention) -> ViCoProcessor | None:
            if name not in attn2:
                return None
            return ViCoProcessor(self.vico_state, attn2[name], module.processor)

        set_attn_processor(unet, factory)
        for layer in self.layer_names:
            hook = image_cross_hook(self.vico_state, layer, self.blocks[key_of(layer)])
            transformer_block(unet, layer).register_forward_hook(hook)
        n_blocks = sum(p.numel() for p in self.blocks.parameters())
        log.info(
            "ViCo: placeholder %r (token %r, from %r), image blocks in %s: %s parameters",
            self.placeholder,
            self.token,
            self.init_word,
            self.layer_names,
            f"{n_blocks:,}",
        )

    @property
    def blocks(self) -> nn.ModuleDict:
        return getattr(self, BLOCKS)

    def vico_parameters(self) -> dict[str, nn.Parameter]:
        """Everything ViCo trains, by state-dict key: the token row and the image blocks."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def trainable_parameters(self) -> list[nn.Parameter | dict]:
        """The token row (``learning_rate``, scaled like the base's) and the image blocks as a
        second group at ``block_lr``, not scaled."""
        blocks = {"params": list(self.blocks.parameters()), "lr": self.block_lr, "scale_lr": False}
        return [placeholder_embedding(self.cond_stage_model).placeholder_weight, blocks]

    def train(self, mode: bool = True) -> ViCo:
        super().train(mode)
        self.model.eval()  # the UNet is frozen
        return self

    # ------------------------------------------------------------- prompts
    def rewrite(self, prompt: str) -> str:
        """The prompt with the placeholder string spelled as the added token."""
        if self.token == self.placeholder or self.token in prompt:
            return prompt
        return prompt.replace(self.placeholder, self.token)

    def reference_token_id(self) -> int:
        """The id the reference maps the placeholder to: its CLIP id (265 for ``*``) when it is
        one base-vocabulary token, else the added token's."""
        ids = self.cond_stage_model.tokenizer(self.placeholder, add_special_tokens=False).input_ids
        return int(ids[0]) if len(ids) == 1 and ids[0] != self.token_id else self.token_id

    def get_learned_conditioning(self, prompts: Sequence[str]) -> Tensor:
        return super().get_learned_conditioning([self.rewrite(p) for p in prompts])

    def prompt_columns(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Per prompt, the column of the first ``*`` (the end token's if there is none) and of
        the end token, in the text encoder's 77 positions."""
        enc = self.cond_stage_model
        ids = enc.tokenize([self.rewrite(p) for p in prompts])  # (B, 77)
        eot = (ids == enc.tokenizer.eos_token_id).int().argmax(1)
        is_token = ids == self.token_id
        first = is_token.int().argmax(1)
        return torch.where(is_token.any(1), first, eot), eot

    # ------------------------------------------------------ visual condition
    @torch.no_grad()
    def reference_latent(self, image: ImageLike, generator: torch.Generator | None = None):
        """Reference image(s) -> scaled latents (R, C, h, w), a posterior sample as in the
        reference. Files and PIL images are resized (bilinear) to the model's resolution;
        tensors are (R, 3, H, W) in [-1, 1]."""
        from data.datasets import open_rgb

        if isinstance(image, Tensor):
            x = image if image.dim() == 4 else image.unsqueeze(0)
        else:
            items = [image] if isinstance(image, str | Path | Image.Image) else list(image)
            size = self.pixel_size()
            arrays = []
            for item in items:
                im = item if isinstance(item, Image.Image) else open_rgb(item)
                im = im.convert("RGB").resize((size, size), Image.BILINEAR)
                arrays.append(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
            x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        size = self.pixel_size()
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = x.to(self.device, self.dtype)
        return self.get_first_stage_encoding(self.encode_first_stage(x), generator)

    def make_condition(self, z_ref: Tensor, prompts: Sequence[str]) -> VisualCondition:
        """Pair reference latents with prompts (one of either is shared by all)."""
        token_cols, eot_cols = self.prompt_columns(prompts)
        r, n = z_ref.shape[0], len(prompts)
        if n > 1 and bool((token_cols == token_cols[0]).all() & (eot_cols == eot_cols[0]).all()):
            token_cols, eot_cols, n = token_cols[:1], eot_cols[:1], 1
        if r != n:
            if min(r, n) != 1:
                raise ValueError(f"{r} reference images for {n} prompts")
            z_ref = z_ref.expand(max(r, n), *z_ref.shape[1:])
            token_cols, eot_cols = token_cols.expand(max(r, n)), eot_cols.expand(max(r, n))
        dev = z_ref.device
        return VisualCondition(z_ref, token_cols.to(dev), eot_cols.to(dev))

    @contextmanager
    def visual_condition(
        self,
        image: ImageLike,
        prompts: Sequence[str],
        generator: torch.Generator | None = None,
    ) -> Iterator[VisualCondition]:
        """Condition every model call inside the block on ``image`` (both CFG halves).

        ``prompts`` are the prompts being sampled: their ``*`` columns select the attention
        map that masks the reference (the empty prompt of CFG reuses them, as the reference)."""
        condition = self.make_condition(self.reference_latent(image, generator), prompts)
        previous, self.vico_state.condition = self.vico_state.condition, condition
        try:
            yield condition
        finally:
            self.vico_state.condition = previous

    # ------------------------------------------------------------- forward
    def conditioning(self, batch: Mapping[str, Any], captions: list[str]) -> Tensor:
        cond = super().conditioning(batch, captions)
        ref = batch.get(self.reference_key)
        if ref is not None:
            x = ref.permute(0, 3, 1, 2).contiguous().to(self.device, self.dtype)
            z_ref = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()
            self.vico_state.condition = self.make_condition(z_ref, captions)
        return cond

    def apply_model(self, x_noisy: Tensor, t: Tensor, cond: Any) -> Tensor:
        condition = self.vico_state.condition
        if condition is None or self.vico_state.active:
            return super().apply_model(x_noisy, t, cond)
        b = x_noisy.shape[0]
        z_ref, token_cols, eot_cols = condition.expand(b)
        regularize = self.training and torch.is_grad_enabled() and self.reg_weight > 0
        dev = x_noisy.device
        self.vico_state.begin(b, token_cols.to(dev), eot_cols.to(dev), regularize)
        try:
            x = torch.cat([x_noisy, z_ref.to(x_noisy)])  # (2B, C, h, w)
            eps = super().apply_model(x, torch.cat([t, t]), _doubled(cond))
        finally:
            self.vico_state.end()
        return eps[:b]

    def extra_losses(
        self, batch: Mapping[str, Any], out: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        losses, self.vico_state.reg_losses = self.vico_state.reg_losses, []
        if batch.get(self.reference_key) is not None:
            self.vico_state.condition = None  # the batch's condition ends with its step
        if not losses:
            return {}
        return {"loss_reg": self.reg_weight * torch.stack(losses).sum()}

    # --------------------------------------------------------------- export
    def export_state_dict(self) -> dict[str, Tensor]:
        """The token row and the image blocks, under their state-dict keys."""
        keys = set(self.vico_parameters())
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items() if k in keys}

    def export_metadata(self) -> dict[str, str]:
        keys = set(self.vico_parameters())
        return {
            "vico_format": VICO_FORMAT,
            "method": "vico",
            "placeholder": self.placeholder,
            "tokens": json.dumps([self.token]),
            "init_word": self.init_word,
            "layers": json.dumps(self.layer_names),
            "base_hash": self.weights_fingerprint(exclude=keys),
            "step": str(int(self.global_step)),
        }
