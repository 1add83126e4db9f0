"""How ViCo runs through the frozen UNet without changing a signature.

The noisy latent and the reference latent travel as ONE batch ``[x; x_ref]`` (2B): every layer
acts per sample (GroupNorm included), so this equals two passes, each stream with its own skip
connections, the same timestep and the same text context (the reference's two streams).

* :class:`ViCoProcessor` sits in the attention-processor slot of the text cross-attention
  (``attn2``) of each chosen block. Its ``project`` passes the projections on unchanged and
  stores the reference stream's head-averaged attention probabilities (B, N, 77) in the shared
  :class:`ViCoState`. Because it hooks ``project`` (not the kernel), processors that wrap the one
  they replace, such as Attend-and-Excite's recorder, keep it working.
* A forward hook on the same ``BasicTransformerBlock`` (after the frozen text block, before
  ``proj_out``) splits its output into ``x, x_ref``, takes the ``*`` column of the stored map,
  thresholds it into the object mask (:func:`~vico.modules.otsu_mask`), applies the image block
  ``x <- block(x, x_ref, mask)``, records the regularizer when training, and re-concatenates.

Layer rule: the reference puts image blocks in SD v1's decoder transformers ``output_blocks.{4,
6,8,10}.1``, i.e. every second decoder transformer starting with the second (mmagic's mask
``[0,1,0,1,0,1,0,1,0]``). Any other UNet gets the same rule over its own decoder transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ldm.modules.attention import (
    AttnProcessor,
    BasicTransformerBlock,
    CrossAttention,
    SpatialTransformer,
)
from vico.modules import attention_regularizer, otsu_mask

#: Module (and state-dict prefix) of the image blocks, as the reference names them.
BLOCKS = "image_cross_attention"


def decoder_transformers(unet: nn.Module) -> list[str]:
    """Names (``output_blocks.N.M``) of the decoder's SpatialTransformers, in execution order."""
    names = []
    for i, block in enumerate(unet.output_blocks):
        for j, child in enumerate(block):
            if isinstance(child, SpatialTransformer):
                names.append(f"output_blocks.{i}.{j}")
    return names


def image_cross_layers(unet: nn.Module) -> list[str]:
    """The reference placement: every second decoder transformer, starting with the second."""
    names = decoder_transformers(unet)
    if len(names) < 2:
        raise ValueError(f"the UNet has {len(names)} decoder transformers; ViCo needs two or more")
    return names[1::2]


def key_of(layer: str) -> str:
    """Module-dict key of a layer name (dots are not allowed in keys)."""
    return layer.replace(".", "_")


@dataclass
class VisualCondition:
    """What the model is conditioned on: reference latents and, per prompt, token columns."""

    z_ref: Tensor  # (R, C, h, w)
    token_cols: Tensor  # (R,) column of ``*`` (the end token when a prompt has none)
    eot_cols: Tensor  # (R,) column of the end token

    def expand(self, batch: int) -> tuple[Tensor, Tensor, Tensor]:
        """Tiled to a model batch: CFG's ``[uncond; cond]`` halves both get the condition
        (the reference reuses the prompt's ``*`` column for the empty prompt)."""
        r = self.z_ref.shape[0]
        if batch % r == 0:
            reps = batch // r
            return (
                self.z_ref.repeat(reps, 1, 1, 1),
                self.token_cols.repeat(reps),
                self.eot_cols.repeat(reps),
            )
        raise ValueError(
            f"visual condition for {r} images cannot serve a model batch of {batch}; give one "
            "reference image and one prompt to condition any batch"
        )


@dataclass
class ViCoState:
    """Shared by the model, the processors and the hooks during one forward."""

    condition: VisualCondition | None = None
    batch: int = 0  # B of the current two-stream forward; 0: not in one
    token_cols: Tensor | None = None
    eot_cols: Tensor | None = None
    regularize: bool = False
    maps: dict[str, Tensor] = field(default_factory=dict)
    reg_losses: list[Tensor] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.batch > 0

    def begin(self, batch: int, token_cols: Tensor, eot_cols: Tensor, regularize: bool) -> None:
        self.batch, self.token_cols, self.eot_cols = batch, token_cols, eot_cols
        self.regularize = regularize
        self.maps.clear()

    def end(self) -> None:
        self.batch = 0
        self.token_cols = self.eot_cols = None
        self.maps.clear()


class ViCoProcessor(AttnProcessor):
    """Text cross-attention that also stores the reference stream's attention map.

    Projections come from the processor it replaces when that is an :class:`AttnProcessor`
    (its ``project`` hook); the kernel is the default one. ``project`` also records
    ``softmax(q k^T)`` of the batch's second half (the reference stream), averaged over heads.
    """

    def __init__(self, state: ViCoState, name: str, base: object = None) -> None:
        self.state = state
        self.name = name
        self.base = base if isinstance(base, AttnProcessor) else AttnProcessor()

    def project(
        self, attn: CrossAttention, x: Tensor, context: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.base.project(attn, x, context)
        b = self.state.batch
        if b and q.shape[0] == 2 * b:
            probs = attn.attention_probs(q[b:], k[b:])  # (B, H, N, 77), reference stream
            self.state.maps[self.name] = probs.mean(1)
        return q, k, v


def image_cross_hook(
    state: ViCoState, name: str, block: Callable[[Tensor, Tensor, Tensor], Tensor]
) -> Callable:
    """Forward hook for the last ``BasicTransformerBlock`` of transformer ``name``."""

    def hook(module: BasicTransformerBlock, args: tuple, output: Tensor) -> Tensor | None:
        b = state.batch
        if not b:
            return None
        if output.shape[0] != 2 * b:
            raise RuntimeError(f"ViCo: {name} got batch {output.shape[0]}, expected 2 x {b}")
        probs = state.maps.pop(name, None)
        if probs is None:
            raise RuntimeError(
                f"ViCo: no reference attention was recorded in {name}; a processor that does "
                "not call its predecessor's project() replaced ViCoProcessor"
            )
        x, x_ref = output[:b], output[b:]  # (B, N, C) each
        rows = torch.arange(b, device=probs.device)
        a_token = probs[rows, :, state.token_cols]  # (B, N)
        mask = otsu_mask(a_token)
        if state.regularize:
            a_eot = probs[rows, :, state.eot_cols]
            state.reg_losses.append(attention_regularizer(a_token, a_eot))
        return torch.cat([block(x, x_ref, mask), x_ref])

    return hook


def attn2_name(unet: nn.Module, layer: str) -> str:
    """Name (relative to the UNet) of the text cross-attention whose map masks ``layer``."""
    depth = len(unet.get_submodule(layer).transformer_blocks)
    return f"{layer}.transformer_blocks.{depth - 1}.attn2"


def transformer_block(unet: nn.Module, layer: str) -> BasicTransformerBlock:
    """The last transformer block of SpatialTransformer ``layer`` (``output_blocks.N.M``)."""
    st = unet.get_submodule(layer)
    if not isinstance(st, SpatialTransformer):
        raise ValueError(f"{layer} is not a SpatialTransformer of the UNet")
    return st.transformer_blocks[-1]
