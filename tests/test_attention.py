"""The processor slot: default SDPA equals explicit attention; installs restore; recording."""

from __future__ import annotations

import torch

from ldm.modules.attention import (
    AttentionRecordProcessor,
    AttentionStore,
    AttnProcessor,
    CrossAttention,
    attention_modules,
    recording,
    set_attn_processor,
)


def einsum_attention(attn: CrossAttention, x, context):
    """The original CompVis einsum formulation, written independently."""
    context = x if context is None else context
    h = attn.heads
    q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
    b = x.shape[0]
    q, k, v = (
        t.reshape(b, t.shape[1], h, -1).permute(0, 2, 1, 3).reshape(b * h, t.shape[1], -1)
        for t in (q, k, v)
    )
    sim = torch.einsum("bid,bjd->bij", q, k) * attn.scale
    out = torch.einsum("bij,bjd->bid", sim.softmax(-1), v)
    out = out.reshape(b, h, -1, out.shape[-1]).permute(0, 2, 1, 3).reshape(b, -1, h * out.shape[-1])
    return attn.to_out(out)


def test_default_processor_matches_einsum():
    torch.manual_seed(0)
    attn = CrossAttention(64, context_dim=32, heads=4, dim_head=16)
    x, ctx = torch.randn(2, 10, 64), torch.randn(2, 7, 32)
    assert isinstance(attn.processor, AttnProcessor)
    torch.testing.assert_close(attn(x, ctx), einsum_attention(attn, x, ctx), atol=1e-5, rtol=1e-5)
    self_attn = CrossAttention(64, heads=4, dim_head=16)
    torch.testing.assert_close(
        self_attn(x), einsum_attention(self_attn, x, None), atol=1e-5, rtol=1e-5
    )


def test_record_processor_same_output_and_probs():
    torch.manual_seed(0)
    attn = CrossAttention(64, context_dim=32, heads=4, dim_head=16)
    x, ctx = torch.randn(2, 10, 64), torch.randn(2, 7, 32)
    ref = attn(x, ctx)
    store = AttentionStore()
    attn.processor = AttentionRecordProcessor(store, "layer")
    torch.testing.assert_close(attn(x, ctx), ref, atol=1e-5, rtol=1e-5)
    probs = store.maps["layer"]
    assert probs.shape == (2, 4, 10, 7)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 10))


def test_set_attn_processor_restores(tiny_model):
    unet = tiny_model.model.diffusion_model
    names = [n for n, _ in attention_modules(unet)]
    assert names and all(n.endswith(("attn1", "attn2")) for n in names)
    before = {n: m.processor for n, m in attention_modules(unet)}
    store = AttentionStore()
    handle = set_attn_processor(
        unet, lambda n, m: AttentionRecordProcessor(store, n) if n.endswith("attn2") else None
    )
    changed = [n for n, m in attention_modules(unet) if m.processor is not before[n]]
    assert changed == [n for n in names if n.endswith("attn2")]
    handle.restore()
    assert all(m.processor is before[n] for n, m in attention_modules(unet))


def test_recording_unet_cross_attention(tiny_model):
    unet = tiny_model.model.diffusion_model
    x = torch.randn(1, 4, 8, 8)
    ctx = torch.randn(1, 77, 32)
    t = torch.tensor([10])
    ref = unet(x, t, ctx)
    with recording(unet, lambda n, m: m.is_cross, keep_grad=False) as store:
        out = unet(x, t, ctx)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert store.maps and all(p.shape[-1] == 77 for p in store.maps.values())
    # Layers at 8x8 hold 64 queries, at 4x4 16 queries.
    assert {p.shape[-2] for p in store.maps.values()} == {64, 16}
    assert all(isinstance(m.processor, AttnProcessor) for _, m in attention_modules(unet))


def test_recording_keeps_grad_for_latent_updates(tiny_model):
    unet = tiny_model.model.diffusion_model
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    with recording(unet, lambda n, m: m.is_cross, keep_grad=True) as store:
        unet(x, torch.tensor([10]), torch.randn(1, 77, 32))
        loss = sum(p[..., 1].max() for p in store.maps.values())
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.abs().sum() > 0


def test_project_hook_changes_only_projections():
    class ZeroValues(AttnProcessor):
        def project(self, attn, x, context):
            q, k, v = super().project(attn, x, context)
            return q, k, torch.zeros_like(v)

    torch.manual_seed(0)
    attn = CrossAttention(64, context_dim=32, heads=4, dim_head=16)
    x, ctx = torch.randn(2, 10, 64), torch.randn(2, 7, 32)
    q, k, v = AttnProcessor().project(attn, x, ctx)
    assert q.shape == (2, 4, 10, 16) and k.shape == v.shape == (2, 4, 7, 16)
    attn.processor = ZeroValues()
    # Zero values: the output is the output projection's bias alone.
    torch.testing.assert_close(attn(x, ctx), attn.to_out[0].bias.expand(2, 10, 64))


def count_kv_calls(model):
    calls = []
    layers = [m for _, m in attention_modules(model) if m.is_cross]
    handles = [m.to_k.register_forward_hook(lambda *a: calls.append(1)) for m in layers]
    return calls, handles, len(layers)


def test_context_kv_cache_same_images_one_projection_per_layer(monkeypatch):
    from contextlib import nullcontext

    import ldm.generate
    from ldm import build_model

    torch.manual_seed(0)
    model = build_model("tiny").eval()
    calls, handles, n_layers = count_kv_calls(model.model)
    cached = ldm.generate.generate(model, ["a red circle"], steps=4, progress=False)
    n_cached = len(calls)
    calls.clear()
    monkeypatch.setattr(ldm.generate, "caching_context_kv", lambda model: nullcontext())
    plain = ldm.generate.generate(model, ["a red circle"], steps=4, progress=False)
    for h in handles:
        h.remove()
    assert torch.equal(cached, plain)
    assert n_cached == n_layers and len(calls) == 4 * n_layers


def test_context_kv_cache_misses_on_new_context_new_weights_and_grad():
    from ldm.modules.attention import caching_context_kv

    torch.manual_seed(0)
    attn = CrossAttention(8, 6, heads=2, dim_head=4)
    x, ctx = torch.randn(1, 5, 8), torch.randn(1, 3, 6)
    calls = []
    attn.to_k.register_forward_hook(lambda *a: calls.append(1))
    with caching_context_kv(attn), torch.no_grad():
        ref = attn(x, ctx)
        assert torch.equal(attn(x, ctx.clone()), ref) and len(calls) == 1  # equal context: hit
        ctx.add_(1)  # the same tensor changed in place: a miss
        assert torch.equal(attn(x, ctx), attn.processor(attn, x, ctx, None))
        assert len(calls) == 2
        ctx.sub_(1)
        before = attn(x, ctx + 2)  # another context: a miss
        assert len(calls) == 3
        attn.to_k.weight.mul_(2)  # weights changed in place (an optimizer step)
        after = attn(x, ctx + 2)
        assert len(calls) == 4 and not torch.equal(after, before)
    with caching_context_kv(attn):
        attn(x, ctx)
        attn(x, ctx)  # gradients on: never cached (A&E differentiates through attention)
    assert len(calls) == 6
    assert attn.kv_cache is None  # off after the block
