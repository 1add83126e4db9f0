"""Attention for the SD v1 UNet, with one processor slot every method plugs into.

``CrossAttention.forward`` only delegates to ``self.processor(attn, x, context, mask)``. The default
processor uses ``scaled_dot_product_attention``; :class:`AttentionRecordProcessor` also records the
attention probabilities (Attend-and-Excite, ViCo). Processors are swapped with
:func:`set_attn_processor`, which walks ``named_modules()`` and can restore the old ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.util import zero_module


class AttnProcessorFn(Protocol):
    def __call__(
        self, attn: CrossAttention, x: Tensor, context: Tensor | None, mask: Tensor | None
    ) -> Tensor: ...


class CrossAttention(nn.Module):
    """Multi-head attention with CompVis parameter names (``to_q/to_k/to_v/to_out.0``)."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.is_cross = context_dim is not None
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))
        self.processor: AttnProcessorFn = AttnProcessor()
        self.kv_cache: dict | None = None  # set by :func:`caching_context_kv`

    def forward(
        self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        return self.processor(self, x, context, mask)

    # Pieces shared by processors, so none of them re-implements the projections.
    def split_heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape  # (B, N, H*D) -> (B, H, N, D)
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def merge_heads(self, t: Tensor) -> Tensor:
        b, h, n, d = t.shape  # (B, H, N, D) -> (B, N, H*D)
        return t.transpose(1, 2).reshape(b, n, h * d)

    def qkv(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        if context is None:
            return self.to_q(x), self.to_k(x), self.to_v(x)
        return self.to_q(x), *self.context_kv(context)

    def context_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """``to_k(context), to_v(context)``; reused while :func:`caching_context_kv` is on, the
        context is equal to the last one and the weights are unchanged (no-grad calls only)."""
        cache = self.kv_cache
        if cache is None or torch.is_grad_enabled():
            return self.to_k(context), self.to_v(context)
        key = (self.to_k.weight._version, self.to_v.weight._version, context.shape, context.dtype)
        hit = cache.get("key") == key and torch.equal(cache["context"], context)
        if not hit:
            # A copy: the caller may change its tensor in place before the next call.
            kv = (self.to_k(context), self.to_v(context))
            cache.update(key=key, context=context.clone(), kv=kv)
        return cache["kv"]

    def attention_probs(self, q: Tensor, k: Tensor, mask: Tensor | None = None) -> Tensor:
        """Softmax attention weights (B, H, Nq, Nk) from head-split q, k."""
        sim = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        if mask is not None:
            sim = sim.masked_fill(~_expand_mask(mask), torch.finfo(sim.dtype).min)
        return sim.softmax(dim=-1)


def _expand_mask(mask: Tensor) -> Tensor:
    """(B, Nk) boolean key mask -> broadcastable (B, 1, 1, Nk)."""
    return mask.bool().reshape(mask.shape[0], 1, 1, -1)


class AttnProcessor:
    """Default processor: fused ``scaled_dot_product_attention``.

    Subclasses that only alter the projections (e.g. detach some keys) override :meth:`project`.
    """

    def project(
        self, attn: CrossAttention, x: Tensor, context: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Head-split ``q, k, v``, each (B, H, N, D)."""
        q, k, v = (attn.split_heads(t) for t in attn.qkv(x, context))
        return q, k, v

    def __call__(
        self, attn: CrossAttention, x: Tensor, context: Tensor | None, mask: Tensor | None
    ) -> Tensor:
        q, k, v = self.project(attn, x, context)
        m = None if mask is None else _expand_mask(mask)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        return attn.to_out(attn.merge_heads(out))


class AttentionStore:
    """Attention probabilities recorded by layer name; re-recording a layer overwrites it."""

    def __init__(self, keep_grad: bool = False) -> None:
        self.keep_grad = keep_grad
        self.maps: dict[str, Tensor] = {}

    def record(self, name: str, probs: Tensor) -> None:
        self.maps[name] = probs if self.keep_grad else probs.detach()

    def clear(self) -> None:
        self.maps.clear()


class AttentionRecordProcessor:
    """Computes attention explicitly and records its probabilities (B, H, Nq, Nk) in a store."""

    def __init__(self, store: AttentionStore, name: str) -> None:
        self.store = store
        self.name = name

    def __call__(
        self, attn: CrossAttention, x: Tensor, context: Tensor | None, mask: Tensor | None
    ) -> Tensor:
        q, k, v = (attn.split_heads(t) for t in attn.qkv(x, context))
        probs = attn.attention_probs(q, k, mask)
        self.store.record(self.name, probs)
        return attn.to_out(attn.merge_heads(torch.matmul(probs, v)))


ProcessorFactory = Callable[[str, CrossAttention], "AttnProcessorFn | None"]


class ProcessorHandle:
    """Remembers the processors replaced by :func:`set_attn_processor`; ``restore()`` undoes it."""

    def __init__(self, previous: dict[CrossAttention, AttnProcessorFn]) -> None:
        self.previous = previous

    def restore(self) -> None:
        for module, proc in self.previous.items():
            module.processor = proc
        self.previous = {}

    def __enter__(self) -> ProcessorHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def attention_modules(model: nn.Module) -> Iterator[tuple[str, CrossAttention]]:
    for name, module in model.named_modules():
        if isinstance(module, CrossAttention):
            yield name, module


def set_attn_processor(model: nn.Module, factory: ProcessorFactory) -> ProcessorHandle:
    """Install ``factory(name, module)`` on every attention layer; ``None`` keeps the current one.

    Returns a handle that restores the previous processors (also usable as a context manager).
    """
    previous: dict[CrossAttention, AttnProcessorFn] = {}
    for name, module in attention_modules(model):
        proc = factory(name, module)
        if proc is not None:
            previous[module] = module.processor
            module.processor = proc
    return ProcessorHandle(previous)


@contextmanager
def caching_context_kv(model: nn.Module) -> Iterator[None]:
    """Within the block, cross-attention layers compute the K/V of a repeated context once.

    The text context is the same at every sampling step, so its K/V projections need not be
    recomputed 50 times; any processor that uses :meth:`CrossAttention.qkv` benefits."""
    layers = [m for _, m in attention_modules(model) if m.is_cross]
    for m in layers:
        m.kv_cache = {}
    try:
        yield
    finally:
        for m in layers:
            m.kv_cache = None


@contextmanager
def recording(model: nn.Module, where: Callable[[str, CrossAttention], bool], keep_grad=False):
    """Record the attention of the layers selected by ``where``; yields the store."""
    store = AttentionStore(keep_grad=keep_grad)

    def factory(name: str, module: CrossAttention) -> AttnProcessorFn | None:
        return AttentionRecordProcessor(store, name) if where(name, module) else None

    with set_attn_processor(model, factory):
        yield store


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention (attn1), cross-attention on the text (attn2), GEGLU feed-forward."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        context_dim: int | None,
        dropout: float = 0.0,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, n_heads, d_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            # Non-reentrant checkpointing keeps gradients w.r.t. inputs and processors' state.
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)

    def _forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """(B, C, H, W) -> tokens -> transformer blocks -> (B, C, H, W), with a residual."""

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        context_dim: int | None = None,
        dropout: float = 0.0,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        inner = n_heads * d_head
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.proj_in = nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, n_heads, d_head, context_dim, dropout, use_checkpoint)
            for _ in range(depth)
        )
        self.proj_out = zero_module(nn.Conv2d(inner, in_channels, 1))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        # The 1x1 projections are kept as convolutions (SD's weight shapes and keys) but run as
        # matrix products on the token layout: BLAS is faster than the 1x1-conv path on CPU and
        # it saves two layout copies.
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
        tokens = F.linear(tokens, self.proj_in.weight.flatten(1), self.proj_in.bias)
        for block in self.transformer_blocks:
            tokens = block(tokens, context=context)
        tokens = F.linear(tokens, self.proj_out.weight.flatten(1), self.proj_out.bias)
        # Back to a contiguous NCHW tensor: a channels-last view here would make every later
        # convolution re-layout its weights on each call (measured: 40% slower inference on CPU).
        return tokens.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous() + x
