"""A Custom Diffusion export, loaded into diffusers' ``StableDiffusionPipeline``, draws the same
images as our sampler: the base goes through ``ldm.convert.write_diffusers``, the delta through
``python -m custom export --format diffusers`` and :func:`load_custom_diffusion`; both sides
run DDIM (eta 0) with classifier-free guidance from the same initial latent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from custom.__main__ import main
from custom.delta import apply_delta, save_delta
from custom.diffusers_loader import load_custom_diffusion
from ldm import resolve_model_config
from ldm.convert import write_diffusers
from ldm.generate import generate, initial_noise
from tests.test_custom import INIT_IDS, TOKENS, custom_model, tiny_base, train_steps

TOL = 1e-4  # max abs difference of [0, 1] images; measured ~1e-6
STEPS, SCALE, SEED = 4, 5.0, 3
PROMPT = f"a photo of a {TOKENS[0]} triangle and a {TOKENS[1]} circle"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(base diffusers folder, exported delta folder, our delta file)."""
    tmp = tmp_path_factory.mktemp("diffusers")
    write_diffusers(tiny_base(0).state_dict(), resolve_model_config("tiny"), tmp / "base")
    trained = train_steps(custom_model(modifier_tokens=TOKENS, initializer_ids=INIT_IDS), 3)
    delta = save_delta(trained, tmp / "delta.safetensors")
    args = ["export", str(delta), "--format", "diffusers", "--config", "tiny", "-o"]
    assert main([*args, str(tmp / "export")]) == 0
    return tmp / "base", tmp / "export", delta


def pipeline(folder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_image(pipe) -> torch.Tensor:
    x_T = initial_noise((4, 8, 8), [SEED], "cpu", torch.float32)
    out = pipe(PROMPT, latents=x_T, num_inference_steps=STEPS, guidance_scale=SCALE, eta=0.0,
               height=32, width=32, output_type="np").images  # fmt: skip
    return torch.from_numpy(np.ascontiguousarray(out)).permute(0, 3, 1, 2)


def our_image(delta) -> torch.Tensor:
    model = tiny_base(0).eval()
    apply_delta(model, delta)
    return generate(model, [PROMPT], steps=STEPS, guidance_scale=SCALE, eta=0.0, seed=SEED,
                    progress=False)  # fmt: skip


def test_export_loads_into_diffusers_and_draws_our_images(exported):
    base, export, delta = exported
    ours = our_image(delta)
    pipe = pipeline(base)
    before = diffusers_image(pipe)  # the base model: the tokens are unknown words
    assert load_custom_diffusion(pipe, export) == TOKENS
    after = diffusers_image(pipe)
    err = float((after - ours).abs().max())
    assert err < TOL, err
    # The delta matters: a loader that silently did nothing could not pass.
    assert float((before - ours).abs().max()) > 100 * TOL
    with pytest.raises(ValueError, match="already exist"):
        load_custom_diffusion(pipe, export)


def test_export_is_what_diffusers_own_loaders_read(exported):
    """The files are in diffusers' format: its own (private-argument) loading path, which the
    documented call silently skips, gives the same images."""
    base, export, delta = exported
    pipe = pipeline(base)
    weights = "pytorch_custom_diffusion_weights.bin"
    pipe.unet.load_attn_procs(export, weight_name=weights, _pipeline=pipe)
    for token in TOKENS:
        pipe.load_textual_inversion(export, weight_name=f"{token}.bin")
    err = float((diffusers_image(pipe) - our_image(delta)).abs().max())
    assert err < TOL, err


def test_loader_refuses_weights_of_another_unet(exported, tmp_path):
    from custom.formats import DIFFUSERS_WEIGHTS
    from ldm.checkpoint import load_state_dict, save_state_dict

    base, export, _ = exported
    pipe = pipeline(base)
    sd = load_state_dict(export / f"{DIFFUSERS_WEIGHTS}.safetensors")
    key = next(iter(sd))
    save_state_dict({key: torch.zeros(3, 3)}, tmp_path / f"{DIFFUSERS_WEIGHTS}.safetensors")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(ValueError, match="shape"):
        load_custom_diffusion(pipe, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())


def test_crossattn_export_sets_all_attn2_weights(tmp_path):
    """``crossattn`` deltas also carry to_q / to_out (weight and bias)."""
    from ldm.convert import unet_compvis_to_diffusers

    write_diffusers(tiny_base(0).state_dict(), resolve_model_config("tiny"), tmp_path / "base")
    trained = train_steps(custom_model(freeze_model="crossattn"), 2)
    delta = save_delta(trained, tmp_path / "delta.safetensors")
    out = tmp_path / "export"
    assert (
        main(["export", str(delta), "--format", "diffusers", "--config", "tiny", "-o", str(out)])
        == 0
    )
    pipe = pipeline(tmp_path / "base")
    load_custom_diffusion(pipe, out)
    params = resolve_model_config("tiny")["unet_config"]["params"]
    want = unet_compvis_to_diffusers(trained.state_dict(), params)
    got = pipe.unet.state_dict()
    changed = [k for k in want if ".attn2." in k and not torch.equal(got[k], tiny_unet(params)[k])]
    assert len(changed) == 7 * 5 and all(torch.equal(got[k], want[k]) for k in want)


def tiny_unet(params):
    from ldm.convert import unet_compvis_to_diffusers

    return unet_compvis_to_diffusers(tiny_base(0).state_dict(), params)
