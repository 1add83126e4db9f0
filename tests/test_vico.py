"""ViCo: trainable set on SD-1.5, frozen UNet, two-stream forward, Otsu mask, checkpoints (ours and
the reference's), sampling with a reference image, and Attend-and-Excite on top."""

from __future__ import annotations

import contextlib
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from attend_excite import AttendExcite
from attend_excite.store import MapsRecorded, capture, select_layers
from ldm import build_model
from ldm.checkpoint import UnsafeCheckpointError, save_state_dict
from ldm.modules.attention import set_attn_processor
from tests.conftest import compose_config
from tests.test_custom import pretrained_like
from vico.formats import ROWS, apply_vico, from_reference, read_vico, to_reference
from vico.modules import ImageCrossAttention, otsu_mask

PROMPT = "a * on the beach"


def vico_model(config="tiny", seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("init_word", "toy")
    model = build_model(config, _target_="vico.model.ViCo", **kwargs)
    return pretrained_like(model, seed) if config != "sd15" else model


def images(n, seed=1):
    return torch.rand(n, 32, 32, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def batch(n=2):
    return {"image": images(n), "reference": images(n, 2), "caption": [PROMPT, "a photo of a *"]}


def test_sd15_trainable_count_and_unet_keys():
    """The reference's 51,248,960 image-block parameters in output_blocks.{4,6,8,10}.1, plus one
    768-wide token row; the UNet keeps exactly SD's state dict (meta device: no memory)."""
    with torch.device("meta"):
        model = vico_model("sd15")
        base = build_model("sd15")
    assert model.layer_names == [f"output_blocks.{i}.1" for i in (4, 6, 8, 10)]
    params = model.vico_parameters()
    rows = params.pop(ROWS)
    assert rows.shape == (1, 768)
    assert all(k.startswith("image_cross_attention.") for k in params)
    assert sum(p.numel() for p in params.values()) == 51_248_960
    widths = [blk.norm1.normalized_shape[0] for blk in model.blocks.values()]
    assert widths == [1280, 640, 640, 320]
    unet, sd_unet = (m.model.diffusion_model.state_dict() for m in (model, base))
    assert {k: v.shape for k, v in unet.items()} == {k: v.shape for k, v in sd_unet.items()}
    assert not any(p.requires_grad for p in model.model.parameters())


def test_training_leaves_the_frozen_model_bit_identical():
    model = vico_model()
    own = model.vico_parameters()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k not in own}
    trained = {k: v.clone() for k, v in model.vico_parameters().items()}
    model.learning_rate = 1e-2
    opt = model.configure_optimizers()
    assert [len(g["params"]) for g in opt.param_groups] == [1, len(trained) - 1]
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-5]
    model.train()
    for _ in range(3):
        loss, logs = model.shared_step(batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(logs["loss_reg"]) and logs["loss_reg"] > 0
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert all(not torch.equal(after[k], v) for k, v in trained.items())
    assert model.vico_state.condition is None and not model.vico_state.active


def test_two_streams_are_independent_and_blocks_act():
    model = vico_model().eval()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    cond = model.get_learned_conditioning([PROMPT] * 2)
    plain = model.apply_model(x, t, cond)
    with torch.no_grad(), model.visual_condition(images(1).permute(0, 3, 1, 2), [PROMPT]):
        eps = model.apply_model(x, t, cond)
        alone = model.apply_model(x[1:], t[1:], cond[1:])
        for blk in model.blocks.values():  # residual branches off: the UNet itself must remain
            for lin in (blk.attn1.to_out[0], blk.attn2.to_out[0], blk.ff.net[2]):
                lin.weight.zero_()
                lin.bias.zero_()
        identity = model.apply_model(x, t, cond)
    assert not torch.allclose(eps, plain, atol=1e-4)
    torch.testing.assert_close(alone, eps[1:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(identity, plain, atol=1e-5, rtol=1e-4)


def reference_otsu(v: torch.Tensor) -> torch.Tensor:
    """The reference's loop (1.3 of the note), one map at a time."""
    out = []
    for row in v:
        vhat = (row - row.min()) / (row.max() - row.min())
        best_g, best_tau = 0.0, 0.0
        for k in range(10):
            tau = k / 10
            lo, hi = vhat[vhat < tau], vhat[vhat >= tau]
            w_lo, w_hi = len(lo) / len(vhat), len(hi) / len(vhat)
            g = w_lo * w_hi * float(lo.mean() - hi.mean()) ** 2 if len(lo) and len(hi) else 0.0
            if g > best_g:
                best_g, best_tau = g, tau
        out.append(vhat >= best_tau)
    return torch.stack(out)


def test_otsu_matches_the_reference_loop():
    g = torch.Generator().manual_seed(0)
    for p in (256, 64, 1024):  # skewed maps, like attention: a few strong patches
        v = torch.rand(8, p, generator=g) ** torch.linspace(0.5, 6, 8).unsqueeze(1)
        assert torch.equal(otsu_mask(v), reference_otsu(v))
    assert otsu_mask(torch.ones(2, 16)).all()  # constant map: all patches (0/0 in the reference)
    two = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 0.05]])
    assert otsu_mask(two).tolist() == [[False, False, False, True, True, False]]


def test_mask_keeps_masked_reference_tokens_out():
    blk = ImageCrossAttention(64).eval()
    g = torch.Generator().manual_seed(0)
    x, ref = torch.randn(2, 16, 64, generator=g), torch.randn(2, 16, 64, generator=g)
    mask = torch.rand(2, 16, generator=g) > 0.5
    other = torch.where(mask.unsqueeze(-1), ref, torch.randn(2, 16, 64, generator=g))
    with torch.no_grad():
        torch.testing.assert_close(blk(x, ref, mask), blk(x, other, mask))
        assert not torch.allclose(blk(x, ref), blk(x, other))


def test_placeholder_columns_and_prompts():
    model = vico_model()
    tok, eot = model.prompt_columns([PROMPT, "a photo of a *", "a photo of a dog"])
    assert tok.tolist() == [2, 5, 6] and eot.tolist() == [6, 6, 6]  # no `*`: the end token
    assert model.rewrite(PROMPT) == f"a {model.token} on the beach"
    with pytest.raises(ValueError, match="zorblax.* is 3 CLIP tokens"):
        vico_model(init_word="zorblax")


def test_checkpoints_ours_and_reference_layout(tmp_path):
    model = vico_model()
    with torch.no_grad():
        for p in model.vico_parameters().values():
            p.add_(torch.randn_like(p))
    path = tmp_path / "last.safetensors"
    save_state_dict(model.export_state_dict(), path, metadata=model.export_metadata())
    tensors, meta = read_vico(path)
    assert set(tensors) == set(model.vico_parameters()) and meta["placeholder"] == "*"
    fresh = vico_model(seed=5)
    apply_vico(fresh, tensors)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in tensors.items())

    emb, ca = to_reference(tensors, meta, tmp_path / "ref", step=399, token_id=265)
    assert emb.name == "embeddings_gs-399.pt" and ca.name == "cross_attention-399.pt"
    keys = torch.load(ca, weights_only=True)
    assert "diffusion_model.output_blocks.1.1.image_cross_attention.attn1.to_q.weight" in keys
    with pytest.raises(pickle.UnpicklingError, match="ParameterDict"):
        torch.load(emb, weights_only=True)  # the reference's real nn.ParameterDict is inside
    back, ref_meta = from_reference(tmp_path / "ref")
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert ref_meta["layers"] == meta["layers"] and ref_meta["step"] == "399"

    class Payload:  # a pickle that would run code when loaded
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"string_to_param": Payload()}, tmp_path / "ref" / "embeddings_gs-400.pt")
    torch.save({}, tmp_path / "ref" / "cross_attention-400.pt")
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        read_vico(tmp_path / "ref")
    with pytest.raises(ValueError, match="does not fit|is \\("):
        apply_vico(vico_model("tiny"), {**tensors, ROWS: torch.zeros(1, 7)})


def test_attend_excite_composes_with_vico():
    model = vico_model().eval()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    cond = model.get_learned_conditioning([PROMPT] * 2)
    layers, _ = select_layers(model.model.diffusion_model, (8, 8), attn_res=4)
    assert {la.name.split(".transformer")[0] for la in layers} & set(model.layer_names)
    with model.visual_condition(images(1).permute(0, 3, 1, 2), [PROMPT]):
        with torch.no_grad():
            eps = model.apply_model(x, t, cond)
            with capture(model.model.diffusion_model, layers, stop_early=False) as store:
                eps_ae = model.apply_model(x, t, cond)  # A&E's recorders wrap ViCo's
        assert {la.name for la in layers} <= set(store.maps)
        torch.testing.assert_close(eps_ae, eps, atol=1e-5, rtol=1e-4)
        hook = AttendExcite.for_prompts(model, [PROMPT] * 2, words=["beach"], attn_res=4)
        moved = hook(x, t, {"i": 0, "num_steps": 50, "cond": cond})
        assert not torch.allclose(moved, x) and hook.history[0][0]["loss"] >= 0

        class Opaque:  # computes attention without the predecessor's project(): refused
            def __call__(self, attn, x, context, mask):
                q, k, v = attn.qkv(x, context)
                return attn.to_out(v if context is None else q)

        unet = model.model.diffusion_model
        with (
            set_attn_processor(unet, lambda n, m: Opaque() if model.layer_names[0] in n else None),
            pytest.raises(RuntimeError, match="no reference attention"),
            contextlib.suppress(MapsRecorded),
            torch.no_grad(),
        ):
            model.apply_model(x, t, cond)


def test_recipe_trains_then_sample_py_uses_the_image(tmp_path):
    import sample
    from main import train

    base = tmp_path / "base.safetensors"  # a tiny base whose output layers are not zero
    save_state_dict(pretrained_like(build_model("tiny")).state_dict(), base)
    over = ["model=tiny", f"model.ckpt={base}", "trainer.max_steps=2", "data.batch_size=2",
            "logger=null", "callbacks.log_samples.steps=2",
            "callbacks.log_samples.prompts=[a *]"]  # fmt: skip
    cfg = compose_config("finetune_vico", over, tmp_path / "run")
    assert cfg.model._target_ == "vico.model.ViCo" and cfg.model.learning_rate == 5e-3
    assert cfg.model.block_lr == 3e-4 and cfg.trainer.max_steps == 2
    train(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    assert {p.name for p in ckpts.iterdir()} == {
        "last.safetensors",
        "embeddings_gs-2.pt",
        "cross_attention-2.pt",
    }
    assert (tmp_path / "run" / "samples" / "final.png").exists()
    ref = tmp_path / "ref.png"
    Image.fromarray(((images(1, 7)[0] + 1) * 127.5).byte().numpy()).save(ref)

    def run(out, *extra):
        over = ["model=tiny", f"ckpt={base}", "n_samples=2", "sampler.steps=3", f"prompt={PROMPT}"]
        over += extra
        paths = sample.run(compose_config("sample", over, tmp_path / out))
        return [np.asarray(Image.open(p)) for p in paths]

    with_image = run("s1", f"vico.ckpt={ckpts / 'last.safetensors'}", f"vico.image={ref}")
    reference_layout = run("s2", f"vico.ckpt={ckpts}", f"vico.image={ref}")
    assert all(np.array_equal(a, b) for a, b in zip(with_image, reference_layout, strict=True))
    ae = run("s3", f"vico.ckpt={ckpts}", f"vico.image={ref}", "attend_excite.enabled=true",
             "attend_excite.words=[beach]", "attend_excite.max_iter_to_alter=2")  # fmt: skip
    assert not all(np.array_equal(a, b) for a, b in zip(with_image, ae, strict=True))
    plain = run("s5")
    assert not all(np.array_equal(a, b) for a, b in zip(with_image, plain, strict=True))
    with pytest.raises(SystemExit, match="needs vico.image"):
        run("s4", f"vico.ckpt={ckpts}")
