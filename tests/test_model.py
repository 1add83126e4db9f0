"""LatentDiffusion: SD v1 key layout, CompVis method names, loss, loader."""

from __future__ import annotations

import pytest
import torch

from ldm import build_model, load_model
from ldm.modules.diffusionmodules.schedule import DDPM_BUFFERS

SD_BUFFERS = set(DDPM_BUFFERS)


def test_sd15_keys_equal_original_layout():
    """Our SD-1.5 state dict is exactly what diffusers' SD-1.5 models convert to (meta tensors)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm import resolve_model_config
    from ldm.convert import (
        text_diffusers_to_compvis,
        unet_diffusers_to_compvis,
        vae_diffusers_to_compvis,
    )
    from tests.test_parity_sd15 import load_json

    cfg = resolve_model_config("sd15")
    with torch.device("meta"):
        ours = build_model(cfg).state_dict()
        unet = UNet2DConditionModel.from_config(load_json("unet")).state_dict()
        vae = AutoencoderKL.from_config(load_json("vae")).state_dict()
        text = CLIPTextModel(CLIPTextConfig(**load_json("text_encoder"))).state_dict()
    ref = {
        **unet_diffusers_to_compvis(unet, cfg["unet_config"]["params"]),
        **vae_diffusers_to_compvis(vae, cfg["first_stage_config"]["params"]["ddconfig"]),
        **text_diffusers_to_compvis(text),
    }
    ref_keys = set(ref) | SD_BUFFERS
    assert set(ours) == ref_keys
    assert all(ours[k].shape == ref[k].shape for k in ref)
    assert sum(1 for k in ours if k.startswith("model.diffusion_model.")) == 686
    n = sum(v.numel() for k, v in ours.items() if k.startswith("model.diffusion_model."))
    assert n == 859_520_964


def test_schedule_buffers_match_compvis_linear():
    model = build_model("tiny")
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(model.betas, betas.float())
    torch.testing.assert_close(model.alphas_cumprod, torch.cumprod(1 - betas, 0).float())


def test_compvis_methods(tiny_ldm):
    model = tiny_ldm
    c = model.get_learned_conditioning(["a photo of a red circle", ""])
    assert c.shape == (2, 77, 32)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = model.get_first_stage_encoding(model.encode_first_stage(x))
    assert z.shape == (2, 4, 8, 8)
    eps = model.apply_model(z, torch.tensor([0, 999]), c)
    assert eps.shape == z.shape
    torch.testing.assert_close(
        model.apply_model(z, torch.tensor([0, 999]), {"c_crossattn": [c]}), eps
    )
    assert model.decode_first_stage(z).shape == x.shape


@pytest.fixture()
def loss_inputs(tiny_model):
    """Latents, context, timesteps and noise of a two-sample batch."""
    z = torch.randn(2, 4, 8, 8)
    c = tiny_model.get_learned_conditioning(["a", "b"])
    return z, c, torch.tensor([10, 500]), torch.randn_like(z)


def test_masked_loss_is_normalised_by_mask_area(tiny_model, loss_inputs):
    z, c, t, noise = loss_inputs
    full, out = tiny_model.p_losses(z, c, t, noise=noise)
    ones, _ = tiny_model.p_losses(z, c, t, noise=noise, mask=torch.ones(2, 1, 8, 8))
    torch.testing.assert_close(full, ones)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4, :] = 1
    half, _ = tiny_model.p_losses(z, c, t, noise=noise, mask=mask)
    err = (out["eps"] - noise) ** 2
    torch.testing.assert_close(half, err[..., :4, :].mean())
    # Each sample is normalised by its own area, then the batch is averaged (as the references).
    mask[1, ..., 1:, :] = 0
    uneven, _ = tiny_model.p_losses(z, c, t, noise=noise, mask=mask)
    torch.testing.assert_close(uneven, (err[0, :, :4].mean() + err[1, :, :1].mean()) / 2)
    assert tiny_model.export_metadata() == {}


def test_loss_weight_scales_each_sample(tiny_model, loss_inputs):
    z, c, t, noise = loss_inputs
    plain, out = tiny_model.p_losses(z, c, t, noise=noise)
    ones, _ = tiny_model.p_losses(z, c, t, noise=noise, weight=torch.ones(2))
    torch.testing.assert_close(plain, ones)
    err = ((out["eps"] - noise) ** 2).flatten(1).mean(1)
    weighted, _ = tiny_model.p_losses(z, c, t, noise=noise, weight=torch.tensor([1.0, 0.25]))
    torch.testing.assert_close(weighted, (err[0] + 0.25 * err[1]) / 2)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4, :] = 1
    weight = torch.tensor([0.0, 2.0])
    masked, _ = tiny_model.p_losses(z, c, t, noise=noise, mask=mask, weight=weight)
    per = ((out["eps"] - noise) ** 2)[..., :4, :].flatten(1).mean(1)
    torch.testing.assert_close(masked, per[1])


def test_training_step_updates_only_unet(tiny_model):
    opt = torch.optim.SGD(tiny_model.trainable_parameters(), lr=0.1)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    batch = {"image": torch.rand(2, 32, 32, 3) * 2 - 1, "caption": ["a red circle", "a square"]}
    loss, logs = tiny_model.shared_step(batch)
    loss.backward()
    opt.step()
    after = tiny_model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.diffusion_model.") for k in changed)
    assert torch.isfinite(logs["loss"])


def test_unknown_argument_is_refused():
    with pytest.raises(TypeError, match="unknown arguments"):
        build_model("tiny", not_an_option=1)


def test_load_model_round_trip(tmp_path, tiny_ldm):
    from ldm.checkpoint import save_state_dict

    path = tmp_path / "tiny.safetensors"
    save_state_dict(tiny_ldm.state_dict(), path)
    loaded = load_model(path, config="tiny")
    assert not loaded.training
    for k, v in tiny_ldm.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_load_model_reports_bad_config_name():
    with pytest.raises(FileNotFoundError, match="known"):
        load_model(None, config="no_such_model")


def test_scale_factor_estimated_once():
    model = build_model("tiny", scale_factor=None)
    assert torch.isnan(model.scale_factor)
    with pytest.raises(RuntimeError, match="scale_factor"):
        model.decode_first_stage(torch.zeros(1, 4, 8, 8))
    assert "scale_factor" in model.state_dict()


def test_ema_tracks_unet_and_is_exported():
    model = build_model("tiny", ema_decay=0.9)
    assert any(k.startswith("model_ema.") for k in model.state_dict())
    opt = torch.optim.SGD(model.trainable_parameters(), lr=1.0)
    start = {k: v.clone() for k, v in model.model.state_dict().items()}
    batch = {"image": torch.rand(2, 32, 32, 3) * 2 - 1, "caption": ["a", "b"]}
    for _ in range(3):
        model.shared_step(batch)[0].backward()
        opt.step()
        opt.zero_grad()
        model.on_train_batch_end(None, batch, 0)
    trained = {k: v.clone() for k, v in model.model.state_dict().items()}
    exported = model.export_state_dict()
    assert not any(k.startswith("model_ema.") for k in exported)
    key = "diffusion_model.out.2.weight"
    ema = exported["model." + key]
    # The EMA lies strictly between the start and the trained weights, and training resumes intact.
    assert not torch.equal(ema, trained[key]) and not torch.equal(ema, start[key])
    assert torch.equal(model.model.state_dict()[key], trained[key])


def test_lr_scheduler_steps_every_optimizer_step(tmp_path):
    """``model.lr_scheduler`` is stepped per step (an epoch here is 8 steps), as written."""
    from functools import partial

    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from toyworld.dataset import ToyWorldDataset

    sched = partial(torch.optim.lr_scheduler.LinearLR, start_factor=1.0, end_factor=0.0,
                    total_iters=4)  # fmt: skip
    model = build_model("tiny", learning_rate=0.1, lr_scheduler=sched)
    seen = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = pl.Trainer(max_steps=3, callbacks=[Record()], logger=False, accelerator="cpu",
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, DataLoader(ToyWorldDataset(length=16), batch_size=2))
    assert seen == pytest.approx([0.1, 0.075, 0.05])
