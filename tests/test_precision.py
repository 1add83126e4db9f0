"""Frozen weights in bf16 (``frozen_dtype``): what is cast, gradients, deltas and sampling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from custom.delta import DeltaMismatchError, save_delta
from ldm.checkpoint import load_state_dict
from ldm.generate import generate
from ldm.precision import NORMS, parse_dtype
from tests.test_custom import TOKENS, batch, custom_model


def grads(model):
    torch.manual_seed(2)
    loss, _ = model.train().shared_step(batch())
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.trainable_parameters()])


def test_only_frozen_non_norm_weights_are_cast():
    model = custom_model(frozen_dtype="bf16")
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORMS) for p in m.parameters()}
    kinds = {"trainable": set(), "norm": set(), "other": set()}
    for p in model.parameters():
        kind = "trainable" if id(p) in trainable else "norm" if id(p) in norm_params else "other"
        kinds[kind].add(p.dtype)
    assert kinds == {
        "trainable": {torch.float32},
        "norm": {torch.float32},
        "other": {torch.bfloat16},
    }
    assert all(b.dtype != torch.bfloat16 for b in model.buffers())


def test_bf16_step_follows_the_fp32_gradient_and_touches_only_trainables():
    loss32, g32 = grads(custom_model())
    model = custom_model(frozen_dtype="bf16")
    loss16, g16 = grads(model)
    assert abs(loss16 - loss32) < 0.02 * loss32
    cos = nn.functional.cosine_similarity(g32, g16, dim=0)
    assert cos > 0.99, cos
    assert g16.dtype == torch.float32
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_bf16_model_saves_fp32_delta_and_samples_in_fp32(tmp_path):
    model = custom_model(frozen_dtype="bf16").eval()
    path = save_delta(model, tmp_path / "delta.safetensors")
    assert {t.dtype for t in load_state_dict(path).values()} == {torch.float32}
    prompt = ["a photo of a <tok-a> triangle"]
    images = generate(model, prompt, steps=3, progress=False)
    ref = generate(custom_model().eval(), prompt, steps=3, progress=False)
    assert images.dtype == torch.float32 and images.shape == ref.shape
    assert (images - ref).abs().mean() < 0.05  # bf16 rounding, not a different image


@pytest.mark.parametrize("bad", ["bfloat", "int8", "16"])
def test_unknown_frozen_dtype_is_refused(bad):
    with pytest.raises(ValueError, match="frozen_dtype must be"):
        parse_dtype(bad)


def test_auto_and_fp32_names():
    assert parse_dtype(None) is None and parse_dtype("fp32") is None
    assert parse_dtype("auto") in (None, torch.bfloat16)


def test_delta_of_a_bf16_frozen_model_belongs_to_the_fp32_base(tmp_path):
    from custom.delta import apply_delta
    from ldm import build_model
    from ldm.checkpoint import save_state_dict

    base = tmp_path / "base.safetensors"
    save_state_dict(custom_model(modifier_tokens=[], initializer_ids=[]).state_dict(), base)

    def load(target="ldm.models.diffusion.ddpm.LatentDiffusion", **kw):
        return build_model("tiny", _target_=target, ckpt=str(base), **kw)

    cd = {"modifier_tokens": TOKENS[:1], "initializer_ids": [[42170]]}
    trained16 = load("custom.model.CustomDiffusion", frozen_dtype="bf16", **cd)
    trained32 = load("custom.model.CustomDiffusion", **cd)
    # Each delta applies to the base in the other precision (a mismatch raises).
    apply_delta(load(), save_delta(trained16, tmp_path / "d16.safetensors"))
    apply_delta(load(frozen_dtype="bf16"), save_delta(trained32, tmp_path / "d32.safetensors"))
    # And a different base is still told apart.
    other = tmp_path / "other.safetensors"
    other_model = custom_model(seed=1, modifier_tokens=[], initializer_ids=[])
    save_state_dict(other_model.state_dict(), other)
    with pytest.raises(DeltaMismatchError):
        apply_delta(
            build_model("tiny", ckpt=str(other), frozen_dtype="bf16"),
            tmp_path / "d16.safetensors",
        )
