"""Custom Diffusion: trainable set, start-token detach, delta round trip, recipes."""

from __future__ import annotations

import json

import pytest
import torch

from custom.delta import DeltaMismatchError, apply_delta, load_delta, save_delta
from custom.model import default_mask_margin, latent_mask
from custom.processors import CustomDiffusionProcessor
from ldm import build_model
from ldm.checkpoint import save_state_dict
from ldm.modules.attention import (
    AttnProcessor,
    CrossAttention,
    attention_modules,
)
from tests.conftest import ROOT, compose_config

TOKENS = ["<tok-a>", "<tok-b>"]  # test-only names: real ones come from config
INIT_IDS = [[42170], [47629]]
ROWS = "cond_stage_model.transformer.text_model.embeddings.token_embedding.placeholder_weight"
# Custom Diffusion's recipes (other methods' finetune_* recipes have their own tests).
RECIPES = sorted(
    p.stem
    for p in (ROOT / "configs").glob("finetune_*.yaml")
    if "override method: custom_diffusion" in p.read_text()
)


def pretrained_like(model, seed=0):
    """Give the UNet's zero-initialised layers (output convs) weights, as a trained base has;
    otherwise the random UNet's output ignores its input and no gradient reaches attention."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.model.diffusion_model.parameters():
            if p.device.type != "meta" and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def tiny_base(seed=0):
    torch.manual_seed(seed)
    return pretrained_like(build_model("tiny"), seed)


def custom_model(config="tiny", seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("modifier_tokens", TOKENS[:1])
    kwargs.setdefault("initializer_ids", INIT_IDS[:1])
    model = build_model(config, _target_="custom.model.CustomDiffusion", **kwargs)
    return pretrained_like(model, seed)


def batch(n=2):
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(n, 32, 32)
    mask[0, :, :16] = 0
    return {
        "image": torch.rand(n, 32, 32, 3, generator=g) * 2 - 1,
        "mask": mask,
        "caption": [f"a photo of a {TOKENS[0]} triangle"] + ["a photo of a circle"] * (n - 1),
    }


def train_steps(model, steps=1, lr=1e-2, weight_decay=0.0):
    """Without weight decay a tensor changes only if a gradient reached it."""
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(steps):
        torch.manual_seed(2)
        loss, _ = model.shared_step(batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def cross_attention_names(model):
    unet = model.model.diffusion_model
    return [f"model.diffusion_model.{n}" for n, m in attention_modules(unet) if m.is_cross]


@pytest.mark.parametrize(
    ("mode", "suffixes"),
    [
        ("crossattn_kv", ["to_k.weight", "to_v.weight"]),
        ("crossattn", ["to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight",
                       "to_out.0.bias"]),
    ],
)  # fmt: skip
def test_exact_trainable_set(mode, suffixes):
    model = custom_model(freeze_model=mode)
    layers = cross_attention_names(model)
    assert len(layers) == 7  # tiny UNet: 2 down, middle, 4 up
    expected = {f"{layer}.{s}" for layer in layers for s in suffixes} | {ROWS}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected == set(model.delta_parameters())
    assert len(model.trainable_parameters()) == len(expected) == 7 * len(suffixes) + 1
    hyphen = custom_model(freeze_model=mode.replace("_", "-"))
    assert set(hyphen.delta_parameters()) == expected


@pytest.mark.parametrize(
    ("mode", "n_unet", "n_tensors"),
    [("crossattn_kv", 19_169_280, 32), ("crossattn", 43_962_560, 80)],
)
def test_sd15_trainable_counts(mode, n_unet, n_tensors):
    """The full-size SD v1 architecture (meta device: no memory) trains the reference's 19.2M /
    44.0M UNet parameters, plus one 768-wide row per token."""
    with torch.device("meta"):
        model = custom_model("sd15", freeze_model=mode, modifier_tokens=TOKENS,
                             initializer_ids=INIT_IDS)  # fmt: skip
    params = model.delta_parameters()
    unet = {k: p for k, p in params.items() if k.startswith("model.diffusion_model.")}
    assert len(unet) == n_tensors and sum(p.numel() for p in unet.values()) == n_unet
    assert params[ROWS].shape == (2, 768) and len(params) == n_tensors + 1


def test_bad_freeze_mode_and_missing_init_ids_are_refused():
    with pytest.raises(ValueError, match="freeze_model must be one of"):
        custom_model(freeze_model="all")
    with pytest.raises(ValueError, match="initializer_ids"):
        custom_model(initializer_ids=None)


def test_token_rows_get_their_own_rate_when_asked():
    same = custom_model(learning_rate=2e-5)
    assert same.param_groups() == list(same.delta_parameters().values())  # the reference
    model = custom_model(learning_rate=2e-5, token_learning_rate=4e-4)
    groups = model.param_groups()  # scale_lr off: the base rates
    assert [g["lr"] for g in groups] == [2e-5, 4e-4]
    assert groups[1]["params"] == [model.cond_stage_model.token_embedding.placeholder_weight]
    assert {id(p) for g in groups for p in g["params"]} == {
        id(p) for p in model.delta_parameters().values()
    }


@pytest.mark.parametrize("mode", ["crossattn_kv", "crossattn"])
def test_step_changes_only_delta_tensors(mode):
    model = custom_model(freeze_model=mode, modifier_tokens=TOKENS, initializer_ids=INIT_IDS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows_before = before[ROWS]
    train_steps(model)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(model.delta_parameters())
    table = ROWS.replace("placeholder_weight", "weight")
    assert torch.equal(before[table], after[table])  # the pretrained rows never move
    assert not torch.equal(rows_before[0], after[ROWS][0])  # the token in the caption learns
    assert torch.equal(rows_before[1], after[ROWS][1])  # the unused one does not


def test_start_token_kv_get_no_gradient():
    torch.manual_seed(0)
    attn = CrossAttention(64, context_dim=32, heads=4, dim_head=16)
    attn.processor = CustomDiffusionProcessor()
    x = torch.randn(2, 10, 64)
    for training, zero in ((True, True), (False, False)):
        ctx = torch.randn(2, 7, 32, requires_grad=True)
        attn.train(training)
        attn(x, ctx).square().sum().backward()
        assert torch.equal(ctx.grad[:, 0], torch.zeros(2, 32)) == zero
        assert ctx.grad[:, 1:].abs().amin(-1).gt(0).all()
    # Self-attention is untouched: every position gets a gradient.
    self_attn = CrossAttention(64, heads=4, dim_head=16).train()
    self_attn.processor = CustomDiffusionProcessor()
    x = torch.randn(1, 5, 64, requires_grad=True)
    self_attn(x).sum().backward()
    assert x.grad[:, 0].abs().sum() > 0


def test_start_token_gets_no_gradient_through_the_unet():
    model = custom_model().train()
    ctx = torch.randn(2, 77, 32, requires_grad=True)
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    model.apply_model(z, t, ctx).square().mean().backward()
    assert torch.equal(ctx.grad[:, 0], torch.zeros(2, 32))
    assert ctx.grad[:, 1].abs().sum() > 0


def test_processor_output_equals_default():
    torch.manual_seed(0)
    attn = CrossAttention(64, context_dim=32, heads=4, dim_head=16)
    x, ctx = torch.randn(2, 10, 64), torch.randn(2, 7, 32)
    for training in (True, False):
        attn.train(training)
        attn.processor = AttnProcessor()
        ref = attn(x, ctx)
        attn.processor = CustomDiffusionProcessor()
        torch.testing.assert_close(attn(x, ctx), ref, atol=0, rtol=0)


def test_latent_mask_min_pool_and_margin():
    mask = torch.zeros(1, 32, 32)
    mask[0, 5:21, 8:24] = 1  # pasted square; latent cells are 4x4 pixels
    m0 = latent_mask(mask, (8, 8), margin=0)[0, 0]
    expected = torch.zeros(8, 8)
    expected[2:5, 2:6] = 1  # cells wholly inside
    assert torch.equal(m0, expected)
    m1 = latent_mask(mask, (8, 8), margin=1)[0, 0]
    expected = torch.zeros(8, 8)
    expected[3:4, 3:5] = 1
    assert torch.equal(m1, expected)
    assert torch.equal(latent_mask(torch.ones(2, 1, 32, 32), (8, 8), 1), torch.ones(2, 1, 8, 8))
    with pytest.raises(ValueError, match="not a multiple"):
        latent_mask(mask, (7, 7))


def test_default_mask_margin_scales_with_latent_size():
    """The reference's one cell on SD's 64x64 latents; none on 8x8 latents, unless set."""
    assert default_mask_margin(64) == 1 and default_mask_margin(8) == 0
    assert custom_model().mask_margin == 0  # tiny: 8x8 latents
    assert custom_model(mask_margin=1).mask_margin == 1


def test_batch_mask_feeds_the_masked_loss():
    model = custom_model()
    z = torch.zeros(2, 4, 8, 8)
    m = model.batch_mask(batch(), z)
    assert m.shape == (2, 1, 8, 8) and m[1].min() == 1 and m[0, 0, :, :4].max() == 0
    assert model.batch_mask({"image": None}, z) is None


def outputs(model, prompt):
    torch.manual_seed(3)
    z, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    with torch.no_grad():
        c = model.get_learned_conditioning([prompt])
        return c, model.apply_model(z, t, c)


def test_delta_round_trip_reproduces_trained_model(tmp_path):
    trained = train_steps(custom_model(modifier_tokens=TOKENS, initializer_ids=INIT_IDS), 2)
    path = save_delta(trained, tmp_path / "delta.safetensors")
    tensors, meta = load_delta(path)
    assert set(tensors) == set(trained.delta_parameters())
    assert meta["method"] == "custom_diffusion" and meta["freeze_model"] == "crossattn_kv"
    assert json.loads(meta["tokens"]) == TOKENS and meta["step"] == "0"
    base = tiny_base(0).eval()  # the base the delta was trained on
    prompt = f"a photo of a {TOKENS[0]} triangle and a {TOKENS[1]} circle"
    assert apply_delta(base, path)["base_hash"] == meta["base_hash"]
    for got, want in zip(outputs(base, prompt), outputs(trained, prompt), strict=True):
        assert torch.equal(got, want)
    # Applying onto a model that already has the tokens (e.g. to resume) works as well.
    again = custom_model(modifier_tokens=TOKENS, initializer_ids=INIT_IDS).eval()
    apply_delta(again, path)
    assert torch.equal(outputs(again, prompt)[1], outputs(trained, prompt)[1])


def test_delta_for_another_base_is_refused(tmp_path, caplog):
    path = save_delta(train_steps(custom_model()), tmp_path / "delta.safetensors")
    other = tiny_base(1)  # different weights: another base
    with pytest.raises(DeltaMismatchError, match="trained on base") as err:
        apply_delta(other, path)
    assert "\n" not in str(err.value)
    assert ROWS not in dict(other.named_parameters())
    apply_delta(other, path, force=True)
    assert "applying anyway" in caplog.text
    clash = custom_model(modifier_tokens=TOKENS[1:], initializer_ids=INIT_IDS[1:])
    with pytest.raises(DeltaMismatchError, match="placeholder tokens"):
        apply_delta(clash, path, force=True)
    with pytest.raises(ValueError, match="not a delta"):
        save_state_dict({"x": torch.zeros(1)}, tmp_path / "plain.safetensors")
        load_delta(tmp_path / "plain.safetensors")


def recipe_overrides(tmp_path, base_ckpt=None):
    return [
        "model=tiny", "trainer.max_steps=2", "data.batch_size=2", "logger=null",
        "callbacks.log_samples=null", f"paths.cache_dir={tmp_path / 'cache'}",
        *([f"model.ckpt={base_ckpt}"] if base_ckpt else []),
    ]  # fmt: skip


SMALL_PREP = {
    "finetune_real": ["prepare.class_images.n=4"],
    "finetune_face": ["prepare.class_images.n=4"],
    "finetune_gen": ["prepare.class_images.n=2", "prepare.class_images.steps=2",
                     "prepare.class_images.batch_size=2"],
    "finetune_joint": ["prepare.class_images.n=4", "prepare.class_images2.n=4"],
}  # fmt: skip


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_two_steps(recipe, tmp_path):
    from hydra.utils import instantiate

    from main import train

    cfg = compose_config(recipe, recipe_overrides(tmp_path) + SMALL_PREP.get(recipe, []),
                         tmp_path / "run")  # fmt: skip
    assert cfg.model._target_ == "custom.model.CustomDiffusion"
    train(cfg)
    tensors, meta = load_delta(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert meta["step"] == "2" and meta["freeze_model"] == cfg.model.freeze_model
    assert json.loads(meta["tokens"]) == list(cfg.model.modifier_tokens)
    assert tensors[ROWS].shape == (len(cfg.model.modifier_tokens), 32)
    n_cross = 7 * (2 if cfg.model.freeze_model == "crossattn_kv" else 5)
    assert len(tensors) == n_cross + 1
    data = instantiate(cfg.data).train_set
    assert len(data) > 0 and data[0]["mask"].shape == (32, 32)


def test_generated_class_images_are_cached(tmp_path):
    from data.class_images import generate_class_images

    torch.manual_seed(0)
    model = build_model("tiny")
    kw = {"prompt": "a photo of a square", "n": 3, "cache_dir": tmp_path / "cache", "steps": 2,
          "batch_size": 2}  # fmt: skip
    out = generate_class_images(model, out=tmp_path / "a", **kw)
    lines = (out / "images.txt").read_text().split()
    assert len(lines) == 3 and (out / "caption.txt").read_text().split("\n")[0] == kw["prompt"]
    stamp = [p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.png")]
    generate_class_images(model, out=tmp_path / "b", **kw)
    assert [p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.png")] == stamp
    assert len(list((tmp_path / "cache").iterdir())) == 1
    generate_class_images(model, out=tmp_path / "c", **{**kw, "n": 2})
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_sample_applies_delta(tmp_path):
    import sample
    from main import train

    base = tmp_path / "base.safetensors"
    save_state_dict(tiny_base(0).state_dict(), base)
    cfg = compose_config("finetune_noreg", recipe_overrides(tmp_path, base), tmp_path / "run")
    train(cfg)
    delta = tmp_path / "run" / "checkpoints" / "last.safetensors"
    prompt = cfg.data.train.concepts[0].instance_prompt  # holds the recipe's token
    common = ["model=tiny", "model.ckpt=null", f"ckpt={base}", "n_samples=1", "sampler.steps=2",
              f"delta={delta}", f"prompt='{prompt}'"]  # fmt: skip
    paths = sample.run(compose_config("sample", common, tmp_path / "s"))
    assert len(paths) == 1 and paths[0].exists()
    other = tmp_path / "other.safetensors"
    save_state_dict(tiny_base(1).state_dict(), other)
    with pytest.raises(SystemExit, match="trained on base"):
        sample.run(compose_config("sample", [*common, f"ckpt={other}"], tmp_path / "s2"))
