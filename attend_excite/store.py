"""Where A&E reads cross-attention, and the processor that records it with its graph.

Layer rule. SD v1 at 512 px reads the five 16x16 cross-attention layers (CompVis
``input_blocks.{7,8}.1`` and ``output_blocks.{3,4,5}.1``): the coarsest resolution of the
down/up path that has attention, which is latent/4 (downsampling factor ``ds = 4``). On any UNet
we take the same place: the largest ``ds <= 4`` among the down/up attention layers (the smallest
one if all are coarser), and every selected-place layer at that ``ds``. The middle block joins only
if it has that resolution (on SD it is 8x8 and, as in the reference, contributes nothing). The toy
and tiny UNets (attention at ``ds`` 1 and 2, middle at 4) get their 4x4 layers. ``attn_res`` picks
a map size explicitly instead, like diffusers' ``attn_res``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ldm.modules.attention import (
    AttentionStore,
    AttnProcessor,
    CrossAttention,
    SpatialTransformer,
    set_attn_processor,
)
from ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

PLACES = ("down", "mid", "up")
#: Downsampling factor of SD v1's 16x16 layers relative to its 64x64 latent.
REFERENCE_DS = 4


@dataclass(frozen=True)
class CrossLayer:
    """A cross-attention layer: name relative to the UNet, place and downsampling factor."""

    name: str
    place: str
    ds: int


def _cross_in(prefix: str, block: nn.Module, place: str, ds: int) -> list[CrossLayer]:
    out = []
    for j, child in enumerate(block):
        if isinstance(child, SpatialTransformer):
            for name, m in child.named_modules():
                if isinstance(m, CrossAttention) and m.is_cross:
                    out.append(CrossLayer(f"{prefix}.{j}.{name}", place, ds))
    return out


def cross_attention_layers(unet: nn.Module) -> list[CrossLayer]:
    """Every cross-attention layer of a CompVis UNet, in execution order."""
    layers: list[CrossLayer] = []
    ds = 1
    for i, block in enumerate(unet.input_blocks):
        layers += _cross_in(f"input_blocks.{i}", block, "down", ds)
        if any(isinstance(m, Downsample) for m in block):
            ds *= 2
    layers += _cross_in("middle_block", unet.middle_block, "mid", ds)
    for i, block in enumerate(unet.output_blocks):
        layers += _cross_in(f"output_blocks.{i}", block, "up", ds)
        if any(isinstance(m, Upsample) for m in block):
            ds //= 2
    return layers


def map_size(latent_hw: Sequence[int], ds: int) -> tuple[int, int]:
    """Feature-map size at downsampling ``ds`` (each stride-2 conv rounds up)."""
    h, w = int(latent_hw[0]), int(latent_hw[1])
    while ds > 1:
        h, w, ds = (h + 1) // 2, (w + 1) // 2, ds // 2
    return h, w


def select_layers(
    unet: nn.Module,
    latent_hw: Sequence[int],
    attn_res: int | Sequence[int] | None = None,
    places: Sequence[str] = PLACES,
) -> tuple[list[CrossLayer], tuple[int, int]]:
    """The layers A&E averages and their map size (h, w), by the module's rule or ``attn_res``."""
    bad = set(places) - set(PLACES)
    if bad or not places:
        raise ValueError(f"places must be a non-empty subset of {PLACES}, got {list(places)}")
    layers = [layer for layer in cross_attention_layers(unet) if layer.place in places]
    if attn_res is None:
        path = sorted({la.ds for la in cross_attention_layers(unet) if la.place != "mid"})
        if not path:
            path = sorted({la.ds for la in layers})
        below = [ds for ds in path if ds <= REFERENCE_DS]
        size = map_size(latent_hw, below[-1] if below else path[0])
    else:
        res = [int(attn_res)] * 2 if isinstance(attn_res, int) else [int(r) for r in attn_res]
        size = (res[0], res[1])
    chosen = [layer for layer in layers if map_size(latent_hw, layer.ds) == size]
    if not chosen:
        have = sorted({(la.place, map_size(latent_hw, la.ds)) for la in layers})
        raise ValueError(
            f"no cross-attention layer in {list(places)} has {size[0]}x{size[1]} maps for a "
            f"{latent_hw[0]}x{latent_hw[1]} latent; available (place, size): {have}"
        )
    return chosen, size


class MapsRecorded(Exception):  # noqa: N818 (a control-flow signal, not an error)
    """Raised by the last recording layer to skip the rest of the UNet forward."""


class AttendExciteProcessor:
    """Explicit attention that records its probabilities (B, H, Nq, Nk) with their graph.

    Projections come from the processor it replaces when that is an :class:`AttnProcessor`
    (its ``project`` hook, e.g. Custom Diffusion's), so only the attention kernel changes.
    """

    def __init__(
        self, store: AttentionStore, name: str, base: object = None, last: bool = False
    ) -> None:
        self.store = store
        self.name = name
        self.base = base if isinstance(base, AttnProcessor) else AttnProcessor()
        self.last = last

    def __call__(
        self, attn: CrossAttention, x: Tensor, context: Tensor | None, mask: Tensor | None
    ) -> Tensor:
        q, k, v = self.base.project(attn, x, context)
        probs = attn.attention_probs(q, k, mask)
        self.store.record(self.name, probs)
        if self.last:
            raise MapsRecorded
        return attn.to_out(attn.merge_heads(torch.matmul(probs, v)))


@contextmanager
def capture(
    unet: nn.Module, layers: Sequence[CrossLayer], stop_early: bool = True
) -> Iterator[AttentionStore]:
    """Record ``layers`` (with gradients) during the block; the old processors come back after.

    With ``stop_early`` the forward ends at the last recorded layer: catch :class:`MapsRecorded`
    around the model call (later layers cannot change the recorded maps).
    """
    store = AttentionStore(keep_grad=True)
    names = [layer.name for layer in layers]
    final = names[-1] if stop_early else None

    def factory(name: str, module: CrossAttention) -> AttendExciteProcessor | None:
        if name not in names:
            return None
        return AttendExciteProcessor(store, name, module.processor, last=name == final)

    with set_attn_processor(unet, factory):
        yield store


def aggregate(store: AttentionStore, layers: Sequence[CrossLayer], size: Sequence[int]) -> Tensor:
    """Mean over all heads of all layers: (B, h, w, Nk), like the reference's
    ``aggregate_attention`` (a layer counts by its number of heads)."""
    missing = [la.name for la in layers if la.name not in store.maps]
    if missing:
        raise RuntimeError(f"cross-attention maps were not recorded for {missing}")
    probs = torch.cat([store.maps[la.name] for la in layers], dim=1)  # (B, sum H, Nq, Nk)
    b, _, nq, nk = probs.shape
    if nq != size[0] * size[1]:
        raise RuntimeError(f"maps have {nq} queries, expected {size[0]}x{size[1]}")
    return probs.mean(1).reshape(b, size[0], size[1], nk)
