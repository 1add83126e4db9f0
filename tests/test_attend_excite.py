"""Attend-and-Excite: token lookup, layer rule, the step hook on the tiny model, sample.py wiring,
and parity with diffusers' ``StableDiffusionAttendAndExcitePipeline`` (its own methods)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from attend_excite import AttendExcite, select_layers, select_tokens
from attend_excite.loss import smoothing_kernel, step_sizes
from attend_excite.store import capture
from ldm import build_model, resolve_model_config
from ldm.models.diffusion.sampling import make_sampler
from ldm.modules.attention import (
    AttnProcessor,
    BasicTransformerBlock,
    attention_modules,
    set_attn_processor,
)
from ldm.modules.encoders.clip import PromptTooLongError
from tests.conftest import SD15_CONFIGS, compose_config

SD15 = SD15_CONFIGS
PIPE = "diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite"
PIPE += ".pipeline_stable_diffusion_attend_and_excite"
SD_BLOCKS = "input_blocks.7 input_blocks.8 output_blocks.3 output_blocks.4 output_blocks.5"
SD_LAYERS = [f"{b}.1.transformer_blocks.0.attn2" for b in SD_BLOCKS.split()]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def with_outputs(model, seed=0):
    """Give the zero-initialised output layers weights (as a trained model has)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.model.diffusion_model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def seeded_tiny():
    torch.manual_seed(0)
    return with_outputs(build_model("tiny"))


def info(i, n, cond):
    return {"i": i, "num_steps": n, "cond": cond}


def test_words_select_every_piece_and_occurrence(tiny_ldm):
    tok = tiny_ldm.cond_stage_model.tokenizer
    sel = select_tokens(tok, "a cat and a dog", ["cat", "dog"])
    assert sel.indices == (2, 5) and sel.pieces == ("cat</w>", "dog</w>") and sel.n_tokens == 7
    assert select_tokens(tok, "a cat, another cat", ["cat"], [1]).indices == (1, 2, 5)
    pieces = tok.tokenize("zorblaxian")
    assert len(pieces) > 1  # a made-up word: several BPE pieces, every one excited
    sel = select_tokens(tok, "a zorblaxian dog", ["zorblaxian"])
    assert sel.indices == tuple(range(2, 2 + len(pieces))) and list(sel.pieces) == pieces


def test_bad_requests_are_refused_clearly(tiny_ldm):
    tok = tiny_ldm.cond_stage_model.tokenizer
    with pytest.raises(ValueError, match=r"'horse'.*not in the prompt.*2: 'cat</w>'"):
        select_tokens(tok, "a cat and a dog", ["horse"])
    for bad in (0, 6):  # the start and end tokens are not prompt tokens
        with pytest.raises(ValueError, match=f"token index {bad} is not a token"):
            select_tokens(tok, "a cat and a dog", token_indices=[bad])
    with pytest.raises(ValueError, match="needs tokens"):
        select_tokens(tok, "a cat", [])
    with pytest.raises(PromptTooLongError, match="82 tokens.*more than the text encoder's 77"):
        AttendExcite.for_prompts(tiny_ldm, ["a cat " * 40], words=["cat"])


def test_layer_rule():
    with torch.device("meta"):
        sd15, toy = build_model("sd15"), build_model("toy", ckpt=None)
    layers, size = select_layers(sd15.model.diffusion_model, (64, 64))
    assert [la.name for la in layers] == SD_LAYERS and size == (16, 16)
    layers, size = select_layers(sd15.model.diffusion_model, (96, 64))  # other image sizes
    assert [la.name for la in layers] == SD_LAYERS and size == (24, 16)
    assert len(select_layers(sd15.model.diffusion_model, (64, 64), 8)[0]) == 1  # the middle
    with pytest.raises(ValueError, match="no cross-attention layer.*available"):
        select_layers(sd15.model.diffusion_model, (64, 64), 12)
    layers, size = select_layers(toy.model.diffusion_model, (8, 8))
    assert size == (4, 4) and {la.place for la in layers} == {"down", "up"} and len(layers) == 3
    assert [la.place for la in select_layers(toy.model.diffusion_model, (8, 8), 2)[0]] == ["mid"]


def test_reference_kernel_and_step_sizes():
    k = smoothing_kernel(3, 0.5)
    torch.testing.assert_close(k.sum(0), torch.tensor([0.2119, 0.5761, 0.2119]), atol=1e-4, rtol=0)
    alphas = step_sizes(20.0, 50)
    np.testing.assert_allclose(alphas, 20 * np.sqrt(np.linspace(1.0, 0.5, 50)))
    assert alphas[0] == 20.0 and abs(alphas[24] - 17.4) < 0.05


@pytest.fixture(scope="module")
def model():
    return seeded_tiny()


def test_hook_moves_latents_only_on_the_first_25_steps(model):
    hook = AttendExcite.for_prompts(model, ["a cat and a dog"] * 2, words=["cat", "dog"])
    procs = {m: m.processor for _, m in attention_modules(model)}
    moved = []
    spy = lambda x, t, inf: moved.append(hook(x, t, inf) - x) or x + moved[-1]  # noqa: E731
    cond = model.get_learned_conditioning(["a cat and a dog"] * 2)
    make_sampler("ddim", model).sample(
        cond, steps=30, shape=(4, 8, 8), step_hooks=[spy], generator=torch.Generator(), progress=0
    )
    assert all(m.abs().max() > 0 for m in moved[:25]) and not any(m.any() for m in moved[25:])
    assert [h["i"] for h in hook.history[1]] == list(range(30))  # recorded at every step
    assert [h["step_size"] > 0 for h in hook.history[0]] == [True] * 25 + [False] * 5
    assert hook.history[0][0]["refinement"]["iterations"] == 20  # random weights never reach it
    assert {m: m.processor for _, m in attention_modules(model)} == procs  # all restored
    with (
        pytest.raises(RuntimeError, match="boom"),
        capture(model.model.diffusion_model, hook.layers) as store,
    ):
        assert store.maps == {} and procs != {m: m.processor for _, m in attention_modules(model)}
        raise RuntimeError("boom")  # also restored when something fails meanwhile
    assert {m: m.processor for _, m in attention_modules(model)} == procs


def test_stop_early_and_batching_change_nothing(model):
    prompts = ["a cat and a dog", "a red circle and a blue square"]
    words = [["cat", "dog"], ["circle", "square"]]
    cond = model.get_learned_conditioning(prompts)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([700])
    for i in (1, 0):  # a plain step, then a refinement step (per image, as diffusers loops)
        kw = {"max_refinement_steps": 3}
        both = AttendExcite.for_prompts(model, prompts[:1], words=words[0], **kw)
        full = AttendExcite.for_prompts(model, prompts[:1], words=words[0], stop_early=False, **kw)
        a, b = both(x[:1], t, info(i, 50, cond[:1])), full(x[:1], t, info(i, 50, cond[:1]))
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        selections = [both.selections[0]] + AttendExcite.for_prompts(
            model, prompts[1:], words=words[1]
        ).selections
        batched = AttendExcite(model, selections, **kw)(x, t.expand(2), info(i, 50, cond))
        torch.testing.assert_close(batched[:1], a, atol=1e-6, rtol=1e-4)
        single = AttendExcite(model, selections[1:], **kw)(x[1:], t, info(i, 50, cond[1:]))
        torch.testing.assert_close(batched[1:], single, atol=1e-6, rtol=1e-4)


def test_gradient_checkpointing_is_refused(tiny_model):
    hook = AttendExcite.for_prompts(tiny_model, ["a cat"], words=["cat"])
    for m in tiny_model.modules():
        if isinstance(m, BasicTransformerBlock):
            m.use_checkpoint = True
    with pytest.raises(RuntimeError, match="gradient checkpointing is on"):
        AttendExcite.for_prompts(tiny_model, ["a cat"], words=["cat"])
    with pytest.raises(RuntimeError, match="use_checkpoint=false"):
        hook(torch.randn(1, 4, 8, 8), torch.tensor([500]), info(0, 50, torch.zeros(1, 77, 32)))


class FakeAttention:
    """Max attention of token k = sigmoid(w_k . x): a smooth stand-in for the UNet."""

    def __init__(self, n_tokens=2, dim=16, seed=0):
        self.w = torch.randn(n_tokens, dim, generator=torch.Generator().manual_seed(seed)) * 0.05

    def maxima(self, x):  # x (4, 2, 2) -> list of K scalars
        return list(torch.sigmoid(self.w @ x.flatten() - 1.0))

    def measure(self, x, t, cond, rows):
        maxima = [torch.stack(self.maxima(xr)) for xr in x]
        losses = torch.stack([(1 - m).clamp_min(0).max() for m in maxima])
        return losses, maxima, [torch.zeros(len(m), 1, 1) for m in maxima]


class FakePipe:
    """Stands in for the pipeline instance its refinement method needs: ``unet`` and the maps."""

    def __init__(self, fake: FakeAttention, pipe) -> None:
        self.fake, self.unet, self.x = fake, self, None
        self._compute_loss, self._update_latent = pipe._compute_loss, pipe._update_latent

    def __call__(self, latents, t, encoder_hidden_states=None):
        self.x = latents
        return SimpleNamespace(sample=None)

    def zero_grad(self) -> None: ...

    def _aggregate_and_get_max_attention_per_token(self, indices):
        return self.fake.maxima(self.x[0])


def diffusers_step(fake, x, i, *, thresholds, max_iter, alpha, max_refine):
    """The A&E part of one step of the pipeline's ``__call__``, with its own methods, per image."""
    pipe = pytest.importorskip(PIPE).StableDiffusionAttendAndExcitePipeline
    out = []
    for xr in x:
        holder = FakePipe(fake, pipe)
        lat = xr[None].clone().requires_grad_(True)
        holder.unet(lat, 0)
        loss = pipe._compute_loss(holder._aggregate_and_get_max_attention_per_token([1, 2]))
        if i in thresholds and loss > 1.0 - thresholds[i]:
            loss, lat, _ = pipe._perform_iterative_refinement_step(
                holder, lat, [1, 2], loss, thresholds[i], None, alpha, 0, max_refine
            )
        if i < max_iter and loss != 0:
            lat = pipe._update_latent(lat, loss, alpha)
        out.append(lat.detach()[0])
    return torch.stack(out)


@pytest.mark.parametrize("i, max_refine", [(0, 20), (0, 3), (10, 20), (1, 20), (30, 20)])
def test_refinement_matches_diffusers(model, i, max_refine):
    fake = FakeAttention()
    x = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(2))
    x[2] = 100 * fake.w.sum(0).view(4, 2, 2)  # an image already above the thresholds
    thresholds = {0: 0.3, 10: 0.7, 30: 0.5}
    hook = AttendExcite.for_prompts(
        model, ["a cat and a dog"], words=["cat"], token_indices=[5], thresholds=thresholds,
        max_refinement_steps=max_refine, log_all_steps=False,
    )  # fmt: skip
    hook._measure = fake.measure
    got = hook(x, torch.zeros(3, dtype=torch.long), info(i, 50, torch.zeros(3, 1, 1)))
    alpha = step_sizes(20.0, 50)[i]
    want = diffusers_step(
        fake, x, i, thresholds=thresholds, max_iter=25, alpha=alpha, max_refine=max_refine
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if i in thresholds:
        iters = [h[-1].get("refinement", {}).get("iterations", 0) for h in hook.history]
        assert iters[2] == 0 and all(0 < n <= max_refine for n in iters[:2]), iters
        if (i, max_refine) == (0, 20):
            assert max(iters) < 20  # stopped by the threshold
        if max_refine == 3:
            assert max(iters) == 3  # stopped by the cap


def test_custom_diffusion_delta_and_installed_processors_survive(tmp_path):
    from custom.delta import apply_delta
    from ldm.checkpoint import fingerprint, save_state_dict

    base, tuned = seeded_tiny(), seeded_tiny()
    key = "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"
    rows = "cond_stage_model.transformer.text_model.embeddings.token_embedding.placeholder_weight"
    delta = {key: torch.randn(64, 32), rows: torch.randn(1, 32)}
    meta = {"delta_format": "1", "method": "custom_diffusion", "tokens": '["<new1>"]'}
    meta["base_hash"] = fingerprint(base.state_dict(), exclude=delta)
    save_state_dict(delta, tmp_path / "delta.safetensors", metadata=meta)
    apply_delta(tuned, tmp_path / "delta.safetensors")  # copies into attn2.to_k itself
    prompt = ["a photo of a <new1> dog"]
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([500])
    cond = tuned.get_learned_conditioning(prompt)

    def first_max():
        hook = AttendExcite.for_prompts(tuned, prompt, words=["<new1>", "dog"])
        hook(x, t, info(1, 50, cond))
        assert hook.selections[0].pieces == ("<new1>", "dog</w>")
        return hook.history[0][0]["max_attention"]

    class ScaledKeys(AttnProcessor):  # like Custom Diffusion's, it only changes projections
        def project(self, attn, x, context):
            q, k, v = super().project(attn, x, context)
            return q, 3 * k, v

    with_delta = first_max()
    with set_attn_processor(tuned, lambda n, m: ScaledKeys() if m.is_cross else None):
        scaled = first_max()  # A&E's processors keep the installed processor's projections
    layer = "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2"
    tuned.get_submodule(layer).to_k.weight.data = base.get_submodule(layer).to_k.weight.data
    assert first_max() != with_delta != scaled  # the measurement sees the delta's weights


def test_sample_writes_record_and_figure(tmp_path):
    import sample

    over = ["model=tiny", "sampler=attend_excite", "sampler.steps=4", "n_samples=3",
            "batch_size=2", "attend_excite.words=[circle]", "attend_excite.max_iter_to_alter=2",
            "attend_excite.max_refinement_steps=2", "prompt=a photo of a red circle"]  # fmt: skip
    paths = sample.run(compose_config("sample", over, tmp_path))
    assert [p.name for p in paths] == ["00000.png", "00001.png", "00002.png"]
    rec = json.loads((tmp_path / "attend_excite_00002.json").read_text())
    assert rec["image"] == "00002.png" and rec["tokens"][0]["piece"] == "circle</w>"
    assert [(s["i"], len(s["max_attention"])) for s in rec["steps"]] == [(i, 1) for i in range(4)]
    assert rec["map_size"] == [4, 4] and rec["settings"]["max_iter_to_alter"] == 2
    assert (tmp_path / "attend_excite_00000.png").read_bytes()[:4] == b"\x89PNG"
    plain = compose_config("sample", ["model=tiny", "attend_excite.words=[horse]"], tmp_path / "p")
    assert not plain.attend_excite.enabled  # off unless asked; then a missing word is refused
    on = compose_config("sample", ["model=tiny", "attend_excite.enabled=true",
                                   "attend_excite.words=[horse]"], tmp_path / "o")  # fmt: skip
    with pytest.raises(ValueError, match="'horse'"):
        sample.run(on)


def sd15_json(name: str, file: str = "config.json") -> dict:
    return json.loads((SD15 / name / file).read_text())


def diffusers_unet(**overrides):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config({**sd15_json("unet"), **overrides}).eval()


@pytest.mark.parametrize("size, steps", [(16, 26), pytest.param(32, 50, marks=pytest.mark.slow)])
def test_whole_sampling_run_matches_the_pipeline(size, steps):
    """The pipeline's own ``__call__`` (DDIM, refinement at steps 0/10/20, two images) on a
    narrow SD-architecture UNet with random weights equals DDIM + our hook."""
    from diffusers import DDIMScheduler

    from ldm.convert import unet_diffusers_to_compvis

    pipe_cls = pytest.importorskip(PIPE).StableDiffusionAttendAndExcitePipeline
    torch.manual_seed(0)
    ref = diffusers_unet(block_out_channels=[32, 64, 64, 64], cross_attention_dim=32)
    config, params = resolve_model_config("tiny"), resolve_model_config("sd15")["unet_config"]
    params = {**params["params"], "model_channels": 32, "channel_mult": [1, 2, 2, 2],
              "context_dim": 32}  # fmt: skip
    ours = build_model({**config, "unet_config": {**config["unet_config"], "params": params}})
    ours.eval()
    ours.load_state_dict(unet_diffusers_to_compvis(ref.state_dict(), params), strict=False)
    sched = DDIMScheduler.from_config(sd15_json("scheduler", "scheduler_config.json"),
                                      steps_offset=1, set_alpha_to_one=False)  # fmt: skip
    enc = ours.cond_stage_model
    pipe = pipe_cls(None, enc.transformer, enc.tokenizer, ref, sched, None, None, False)
    prompt, x_T = "a cat and a dog", torch.randn(2, 4, size, size, generator=torch.Generator())
    res = (size // 4, size // 4)
    want = pipe(prompt, [2, 5], height=8 * size, width=8 * size, num_inference_steps=steps,
                latents=x_T, num_images_per_prompt=2, output_type="latent",
                attn_res=res).images  # fmt: skip
    hook = AttendExcite.for_prompts(ours, [prompt], words=["cat", "dog"])
    with torch.no_grad():
        cond, uncond = ours.get_learned_conditioning([prompt, ""]).chunk(2)
    got = make_sampler("ddim", ours).sample(
        cond, uncond=uncond, steps=steps, x_T=x_T, step_hooks=[hook], progress=False
    )
    assert hook.size == res
    assert [h[0]["refinement"]["iterations"] for h in hook.history] == [20, 20]
    assert rel_err(got, want) < 1e-4  # measured 1.2e-6 (16x16 latent, 26 steps)


def test_sd15_step_matches_the_pipeline():
    """Full-size SD-1.5, random weights, 64x64 latent (16x16 maps): one A&E step equals the
    pipeline's ``_aggregate_and_get_max_attention_per_token`` / ``_compute_loss`` /
    ``_update_latent`` with its ``AttendExciteAttnProcessor`` on attn2 (attn1 stays fused: ~3 GB
    less). The update is a gradient through the whole UNet: diffusers against itself with
    explicit instead of fused self-attention already differs by ~2e-4 (relative max)."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.convert import unet_diffusers_to_compvis

    mod = pytest.importorskip(PIPE)
    torch.manual_seed(0)
    unet = diffusers_unet()
    text = CLIPTextModel(CLIPTextConfig(**sd15_json("text_encoder"))).eval()
    with torch.device("meta"):
        ours = build_model("sd15")
    params = resolve_model_config("sd15")["unet_config"]["params"]
    sd = unet_diffusers_to_compvis(unet.state_dict(), params)
    ours.load_state_dict(sd, strict=False, assign=True)  # shares the tensors: one UNet in memory
    tok = ours.cond_stage_model.tokenizer
    prompt, i, n, t = "a cat and a dog", 1, 50, 961  # DDIM-50 step 1
    with torch.no_grad():
        ids = tok(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
        cond = text(ids).last_hidden_state
    x = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(3))

    hook = AttendExcite.for_prompts(ours, [prompt], words=["cat", "dog"])
    got = hook(x, torch.tensor([t]), info(i, n, cond))
    assert [la.name for la in hook.layers] == SD_LAYERS and hook.size == (16, 16)

    pipe_cls = mod.StableDiffusionAttendAndExcitePipeline
    pipe = pipe_cls(None, text, tok, unet, None, None, None, False)
    assert {k: pipe.get_indices(prompt)[k] for k in (2, 5)} == {2: "cat</w>", 5: "dog</w>"}
    pipe.attention_store = mod.AttentionStore((16, 16))
    place = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}
    procs = {k: mod.AttendExciteAttnProcessor(pipe.attention_store, place[k.split(".")[0]])
             if ".attn2." in k else AttnProcessor2_0() for k in unet.attn_processors}  # fmt: skip
    pipe.attention_store.num_att_layers = sum(".attn2." in k for k in procs)
    unet.set_attn_processor(procs)
    with torch.enable_grad():
        latents = x.clone().requires_grad_(True)
        pipe.unet(latents, t, encoder_hidden_states=cond)
        maxima = pipe._aggregate_and_get_max_attention_per_token(indices=[2, 5])
        loss = pipe._compute_loss(maxima)
        alpha = 20 * np.sqrt(np.linspace(1.0, 0.5, n))[i]
        want = pipe._update_latent(latents, loss, alpha).detach()
    rec = hook.history[0][0]
    np.testing.assert_allclose(rec["max_attention"], [float(m) for m in maxima], rtol=1e-5)
    assert abs(rec["loss"] - float(loss)) < 1e-6 and abs(rec["step_size"] - alpha) < 1e-9
    assert rel_err(got - x, want - x) < 2e-3  # measured 3.1e-4
