"""CompVis <-> diffusers conversion, checked against diffusers' own converters.

State dicts are built from diffusers' / transformers' own modules (on the meta device, then filled
with seeded random values so every tensor is distinct). ``sd15`` uses the real SD v1.5 configs and
``v1-inference.yaml``; ``small`` is a non-SD size (a level without attention, depth-2
transformers, a 3-level VAE) so the config-derived key maps are exercised beyond SD's shape.
"""

from __future__ import annotations

import gc
import inspect
import json
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import load_state_dict, save_state_dict
from ldm.convert import (
    DDPM_BUFFERS,
    TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    compvis_to_diffusers,
    ddpm_schedule_buffers,
    diffusers_configs,
    diffusers_to_compvis,
    main,
    normalize_model_config,
    text_compvis_to_diffusers,
    text_diffusers_to_compvis,
    unet_compvis_to_diffusers,
    unet_diffusers_to_compvis,
    vae_compvis_to_diffusers,
    vae_diffusers_to_compvis,
)
from tests.conftest import ROOT, SD15_CONFIGS

SD15 = SD15_CONFIGS
# diffusers' single-file config builders take the image size only through a deprecated argument.
pytestmark = pytest.mark.filterwarnings("ignore:`image_size` is deprecated:FutureWarning")
CONFIGS = ["small", "sd15"]

SMALL: dict[str, Any] = {
    "_target_": "ldm.models.diffusion.ddpm.LatentDiffusion",
    "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.18215,
    "image_size": 8,
    "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [4, 2],
        "num_res_blocks": 2, "channel_mult": [1, 2, 2], "num_heads": 4, "transformer_depth": 2,
        "context_dim": 48, "use_checkpoint": False}},
    "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
        "embed_dim": 4, "ddconfig": {
            "double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3, "out_ch": 3,
            "ch": 32, "ch_mult": [1, 2, 4], "num_res_blocks": 1, "attn_resolutions": [],
            "dropout": 0.0}}},
    "cond_stage_config": {"target": "ldm.modules.encoders.FrozenCLIPEmbedder", "params": {
        "text_config": {"vocab_size": 49408, "hidden_size": 48, "intermediate_size": 96,
                        "num_hidden_layers": 2, "num_attention_heads": 4,
                        "max_position_embeddings": 77, "hidden_act": "quick_gelu"}}},
}  # fmt: skip


def model_config(name: str) -> dict[str, Any]:
    if name == "small":
        return normalize_model_config(SMALL)
    return normalize_model_config(SD15 / "v1-inference.yaml")


def diffusers_config(name: str, part: str) -> dict[str, Any]:
    """The real SD 1.5 config, or (small) the one derived by ldm.convert."""
    if name == "sd15":
        return json.loads((SD15 / part / "config.json").read_text())
    return diffusers_configs(model_config(name))[part]


def original_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The v1-inference.yaml form diffusers' converters read."""
    params = {k: v for k, v in cfg.items() if k != "_target_"}
    return {"model": {"target": cfg["_target_"], "params": params}}


def pixels(cfg: Mapping[str, Any]) -> int:
    """Image size in pixels: latent size x the VAE's downsampling factor."""
    levels = len(cfg["first_stage_config"]["params"]["ddconfig"]["ch_mult"])
    return cfg["image_size"] * 2 ** (levels - 1)


def random_state_dict(build: Callable[[], torch.nn.Module], seed: int) -> dict[str, torch.Tensor]:
    """State dict of ``build()`` (made on the meta device) with seeded N(0, 1) values."""
    with torch.device("meta"):
        module = build()
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in module.state_dict().items()}


def random_parts(name: str) -> dict[str, dict[str, torch.Tensor]]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet, vae = diffusers_config(name, "unet"), diffusers_config(name, "vae")
    text = CLIPTextConfig(**diffusers_config(name, "text_encoder"))
    return {
        "unet": random_state_dict(lambda: UNet2DConditionModel.from_config(unet), 0),
        "vae": random_state_dict(lambda: AutoencoderKL.from_config(vae), 1),
        "text_encoder": random_state_dict(lambda: CLIPTextModel(text), 2),
    }


def assert_same(got: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    differ = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not differ, differ[:5]


def resolved(cls: type, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` over ``cls.__init__``'s defaults, tuples as lists, private keys dropped."""
    defaults = {
        k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }  # fmt: skip
    merged = {**defaults, **{k: v for k, v in cfg.items() if not k.startswith("_")}}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in merged.items()}


# ------------------------------------------------------------------------------------ configs
def test_sd15_configs_equal_the_real_ones():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    ours_yaml = normalize_model_config(ROOT / "configs/model/sd15.yaml")
    for cfg in (model_config("sd15"), ours_yaml):
        ours = diffusers_configs(cfg)
        for part, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
            assert resolved(cls, ours[part]) == resolved(cls, diffusers_config("sd15", part))
        real_text = diffusers_config("sd15", "text_encoder")
        text, ref = CLIPTextConfig(**ours["text_encoder"]), CLIPTextConfig(**real_text)
        # provenance fields, and "dropout", which CLIPTextConfig no longer has (ignored extra)
        drop = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "dropout"}
        if cfg is ours_yaml:  # as our model builds it: transformers' special-token ids, which
            drop |= {"bos_token_id", "eos_token_id"}  # change neither weights nor hidden states
        assert {k: v for k, v in text.to_dict().items() if k not in drop} == {
            k: v for k, v in ref.to_dict().items() if k not in drop
        }
        real_sched = json.loads((SD15 / "scheduler" / "scheduler_config.json").read_text())
        assert {k: ours["scheduler"][k] for k in real_sched if k[0] != "_"} == {
            k: v for k, v in real_sched.items() if k[0] != "_"
        }


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_agree_with_diffusers_derivation(name):
    """Our UNet/VAE configs equal diffusers' own ``create_*_config`` on the same CompVis config."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from diffusers.pipelines.stable_diffusion import convert_from_ckpt as legacy

    cfg = model_config(name)
    orig, size, ours = original_config(cfg), pixels(cfg), diffusers_configs(cfg)
    unet_refs = [sfu.create_unet_diffusers_config_from_ldm(orig, {}, image_size=size),
                 legacy.create_unet_diffusers_config(orig, image_size=size)]  # fmt: skip
    for ref in unet_refs:
        assert resolved(UNet2DConditionModel, ours["unet"]) == resolved(UNet2DConditionModel, ref)
    vae_refs = [sfu.create_vae_diffusers_config_from_ldm(orig, {}, image_size=size),
                legacy.create_vae_diffusers_config(orig, image_size=size)]  # fmt: skip
    for ref in vae_refs:
        assert resolved(AutoencoderKL, ours["vae"]) == resolved(AutoencoderKL, ref)


def test_schedule_matches_diffusers_scheduler():
    from diffusers import DDIMScheduler, PNDMScheduler

    cfg = diffusers_configs(SMALL)["scheduler"]
    ours = ddpm_schedule_buffers(0.00085, 0.012, 1000)
    for cls in (PNDMScheduler, DDIMScheduler):
        sched = cls.from_config(cfg)
        torch.testing.assert_close(ours["betas"], sched.betas, rtol=1e-5, atol=0)
        torch.testing.assert_close(ours["alphas_cumprod"], sched.alphas_cumprod, rtol=1e-4, atol=0)
    assert list(ours) == list(DDPM_BUFFERS)
    assert all(v.dtype == torch.float32 and v.shape == (1000,) for v in ours.values())


# ------------------------------------------------------------------------------ weight maps
@pytest.mark.parametrize("name", CONFIGS)
def test_unet_roundtrip_and_diffusers_converters(name):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from diffusers.pipelines.stable_diffusion import convert_from_ckpt as legacy

    cfg = model_config(name)
    params, orig, size = cfg["unet_config"]["params"], original_config(cfg), pixels(cfg)
    unet = diffusers_config(name, "unet")
    ref = random_state_dict(lambda: UNet2DConditionModel.from_config(unet), 0)
    compvis = unet_diffusers_to_compvis(ref, params)
    assert all(k.startswith(UNET_PREFIX) for k in compvis) and len(compvis) == len(ref)
    assert_same(unet_compvis_to_diffusers(compvis, params), ref)
    new = sfu.convert_ldm_unet_checkpoint(
        compvis, sfu.create_unet_diffusers_config_from_ldm(orig, compvis, image_size=size)
    )
    assert_same(new, ref)
    old = legacy.convert_ldm_unet_checkpoint(
        dict(compvis), legacy.create_unet_diffusers_config(orig, image_size=size)
    )
    assert_same(old, ref)
    del ref, compvis, new, old
    gc.collect()


@pytest.mark.parametrize("name", CONFIGS)
def test_vae_roundtrip_and_diffusers_converters(name):
    from diffusers import AutoencoderKL
    from diffusers.loaders import single_file_utils as sfu
    from diffusers.pipelines.stable_diffusion import convert_from_ckpt as legacy

    cfg = model_config(name)
    ddconfig = cfg["first_stage_config"]["params"]["ddconfig"]
    orig, size = original_config(cfg), pixels(cfg)
    ref = random_state_dict(lambda: AutoencoderKL.from_config(diffusers_config(name, "vae")), 1)
    compvis = vae_diffusers_to_compvis(ref, ddconfig)
    assert all(k.startswith(VAE_PREFIX) for k in compvis) and len(compvis) == len(ref)
    attn_q = VAE_PREFIX + "decoder.mid.attn_1.q.weight"
    assert compvis[attn_q].shape[2:] == (1, 1)  # CompVis 1x1 conv
    assert_same(vae_compvis_to_diffusers(compvis, ddconfig), ref)
    new = sfu.convert_ldm_vae_checkpoint(
        compvis, sfu.create_vae_diffusers_config_from_ldm(orig, compvis, image_size=size)
    )
    assert_same(new, ref)
    old = legacy.convert_ldm_vae_checkpoint(
        dict(compvis), legacy.create_vae_diffusers_config(orig, image_size=size)
    )
    assert_same(old, ref)


@pytest.mark.parametrize("name", CONFIGS)
def test_text_encoder_roundtrip_and_diffusers_converter(name):
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    text = CLIPTextConfig(**diffusers_config(name, "text_encoder"))
    ref = random_state_dict(lambda: CLIPTextModel(text), 2)
    compvis = text_diffusers_to_compvis(ref)
    assert all(k.startswith(TEXT_PREFIX + "text_model.") for k in compvis)
    assert_same(sfu.convert_ldm_clip_checkpoint(compvis), ref)
    position_ids = TEXT_PREFIX + "text_model.embeddings.position_ids"  # in old checkpoints
    assert_same(text_compvis_to_diffusers({**compvis, position_ids: torch.arange(77)[None]}), ref)


def test_whole_model_roundtrip_ema_and_mismatch():
    parts = random_parts("small")
    sd = diffusers_to_compvis(parts, SMALL)
    assert_same({k: sd[k] for k in DDPM_BUFFERS}, ddpm_schedule_buffers(0.00085, 0.012, 1000))
    full_ema = {**sd, "model_ema.decay": torch.tensor(0.99)}
    for k, v in sd.items():  # LitEma names: "model_ema." + name without "model." and dots
        if k.startswith(UNET_PREFIX):
            full_ema["model_ema." + k[len("model.") :].replace(".", "")] = v + 1
    for key, back in compvis_to_diffusers(full_ema, SMALL).items():
        assert_same(back, parts[key])
    ema_unet = compvis_to_diffusers(full_ema, SMALL, use_ema=True)["unet"]
    assert torch.equal(ema_unet["conv_in.weight"], parts["unet"]["conv_in.weight"] + 1)
    wrong = normalize_model_config(SMALL)
    wrong["unet_config"]["params"]["num_res_blocks"] = 1
    with pytest.raises(ValueError, match=r"UNet weights do not match the config: \d+ missing"):
        compvis_to_diffusers(sd, wrong)
    wide = normalize_model_config(SMALL)
    wide["unet_config"]["params"]["model_channels"] = 64
    with pytest.raises(ValueError, match="conv_in.weight has shape"):
        compvis_to_diffusers(sd, wide)


@pytest.mark.parametrize("name", ["tiny", "toy"])
def test_our_model_through_a_diffusers_folder(name, tmp_path):
    """Our LatentDiffusion's state dict -> diffusers folder -> back: same keys, same tensors,
    and the config read back from the folder builds a model that takes them (toy: the trained
    ``scale_factor`` buffer survives)."""
    from ldm import build_model, resolve_model_config
    from ldm.checkpoint import load_into
    from ldm.convert import read_diffusers, write_diffusers

    cfg = resolve_model_config(name)
    torch.manual_seed(0)
    sd = build_model(cfg, ckpt=None).state_dict()
    if cfg["scale_factor"] is None:
        sd["scale_factor"].fill_(0.75)
    write_diffusers(sd, cfg, tmp_path / name)
    back, guessed = read_diffusers(tmp_path / name)
    assert_same(back, sd)
    for key in ("unet_config", "first_stage_config", "cond_stage_config", "scale_factor"):
        assert guessed[key] == cfg[key], key
    assert load_into(build_model(guessed, ckpt=None), back, strict=True) == ([], [])


# ----------------------------------------------------------------------------------------- CLI
def test_cli_roundtrip_and_diffusers_loading(tmp_path, capsys):
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    config = tmp_path / "small.yaml"
    OmegaConf.save(SMALL, config)
    parts = random_parts("small")
    sd = diffusers_to_compvis(parts, SMALL)
    src, out = tmp_path / "small.ckpt", tmp_path / "small_diffusers"
    back = tmp_path / "back.safetensors"
    save_state_dict(sd, src)

    assert main(["--to", "diffusers", str(src), str(out), "--config", str(config)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    loaded = {
        "unet": UNet2DConditionModel.from_pretrained(out / "unet"),
        "vae": AutoencoderKL.from_pretrained(out / "vae"),
        "text_encoder": CLIPTextModel.from_pretrained(out / "text_encoder"),
    }
    for key, model in loaded.items():
        assert_same(model.state_dict(), parts[key])
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    assert tokenizer("a dog").input_ids == [49406, 320, 1929, 49407]
    for cls in (PNDMScheduler, DDIMScheduler):
        assert cls.from_pretrained(out / "scheduler").config.steps_offset == 1
    pipe = StableDiffusionPipeline.from_pretrained(out)
    image = pipe("a dog", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3)

    assert main(["--to", "compvis", str(out), str(back)]) == 0
    assert_same(load_state_dict(back), sd)
    assert_same(load_state_dict(out), sd)  # a diffusers folder loads directly too

    before = sorted(p.name for p in out.rglob("*"))
    capsys.readouterr()
    assert main(["--to", "diffusers", str(src), str(out), "--config", str(config)]) == 1
    assert main(["--to", "compvis", str(out), str(back)]) == 1
    assert main(["--to", "diffusers", str(tmp_path / "nope.ckpt"), str(tmp_path / "x")]) == 1
    assert main(["--to", "compvis", str(src), str(tmp_path / "y.safetensors")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err), err
    assert "--overwrite" in err[0] and "not found" in err[2]
    assert sorted(p.name for p in out.rglob("*")) == before
    args = ["--to", "diffusers", str(src), str(out), "--config", str(config), "--overwrite"]
    assert main(args) == 0
    assert sorted(p.name for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
