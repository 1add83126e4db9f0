"""Convert SD v1 weights between the CompVis layout and a diffusers pipeline folder.

Key maps are generated from the CompVis model config (``unet_config.params``,
``first_stage_config.params.ddconfig``), so any size works, not just SD's. Tensors are renamed,
never copied; only the VAE mid-block attention changes shape (1x1 conv <-> linear, as views).
diffusers itself is not imported (the tests use it as an independent reference).

CLI::

    python -m ldm.convert --to diffusers SRC.(ckpt|safetensors) OUT_DIR [--config sd15|PATH]
    python -m ldm.convert --to compvis SRC_DIR OUT.(safetensors|ckpt)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import load_state_dict, save_state_dict, summarize_keys

log = logging.getLogger(__name__)

Tensors = Mapping[str, torch.Tensor]
Pairs = list[tuple[str, str]]  # (CompVis key, diffusers key)
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
TEXT_PREFIX, EMA_PREFIX = "cond_stage_model.transformer.", "model_ema."
DDPM_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
)  # fmt: skip
TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "clip_tokenizer"
DIFFUSERS_VERSION = "0.39.0"  # written into the configs we produce
SD_SCALE_FACTOR = 0.18215
# SD v1's text tower (openai/clip-vit-large-patch14) as in SD 1.5's text_encoder/config.json.
SD_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
}
# CLIPTextConfig fields that shape the weights or the hidden states (read back from a folder).
TEXT_ARCH_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "hidden_act", "layer_norm_eps", "projection_dim",
)  # fmt: skip
SCHEDULES = {"linear": "scaled_linear", "linear_beta": "linear"}  # CompVis -> diffusers name
# Options whose other values change the weights' layout or meaning (not supported here).
_UNET_FIXED = {
    "use_spatial_transformer": True,
    "resblock_updown": False,
    "conv_resample": True,
    "use_scale_shift_norm": False,
    "num_classes": None,
    "dims": 2,
}
_DIFFUSERS_UNET_FIXED = {
    "act_fn": "silu",
    "addition_embed_type": None,
    "center_input_sample": False,
    "class_embed_type": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
}
_DIFFUSERS_VAE_FIXED = {
    "act_fn": "silu",
    "norm_num_groups": 32,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


# ------------------------------------------------------------------------------------ configs
def normalize_model_config(cfg: Any) -> dict[str, Any]:
    """The flat form (``_target_`` + LatentDiffusion kwargs) of ``cfg``, which may be that form,
    a CompVis ``{model: {target, params}}`` or ``{target, params}`` mapping, a root config with a
    ``model`` entry (dicts or OmegaConf), or a YAML path."""
    if isinstance(cfg, str | Path):
        cfg = OmegaConf.load(cfg)
    if not isinstance(cfg, Mapping) and not OmegaConf.is_config(cfg):
        raise ValueError(f"model config must be a mapping, got {type(cfg).__name__}")
    try:
        node = cfg if OmegaConf.is_config(cfg) else OmegaConf.create(dict(cfg))
    except Exception:  # noqa: BLE001 - values OmegaConf cannot hold: keep the mapping as is
        node = None
    if node is None:
        flat: dict[str, Any] = copy.deepcopy(dict(cfg))
    else:
        try:
            flat = OmegaConf.to_container(node, resolve=True)  # type: ignore[assignment]
        except Exception:  # noqa: BLE001 - Hydra interpolations that only resolve inside a run
            flat = OmegaConf.to_container(node, resolve=False)  # type: ignore[assignment]
    model = flat.get("model")
    if isinstance(model, Mapping) and ("params" in model or "unet_config" in model):
        flat = dict(model)  # a CompVis YAML, or a Hydra root config with a model group
    if "params" in flat and "unet_config" not in flat:
        flat = {"_target_": flat.get("target"), **(flat["params"] or {})}
    missing = [k for k in ("unet_config", "first_stage_config") if k not in flat]
    if missing:
        raise ValueError(f"model config lacks {missing} (has {sorted(flat)})")
    return flat


def _params(cfg: Mapping[str, Any]) -> tuple[dict, dict, int, dict]:
    """(UNet params, VAE ddconfig, VAE embed_dim, text_config overrides) of a flat config."""
    try:
        first = cfg["first_stage_config"]["params"]
        cond = (cfg.get("cond_stage_config") or {}).get("params") or {}
        text = cond.get("text_config") or {}
        return cfg["unet_config"]["params"], first["ddconfig"], first["embed_dim"], text
    except (KeyError, TypeError) as exc:
        raise ValueError(f"model config lacks {exc}") from None


def _attn_levels(p: Mapping[str, Any]) -> list[bool]:
    """Cross-attention per level: at downsample factor ds = 2**level in attention_resolutions."""
    return [2**lvl in p["attention_resolutions"] for lvl in range(len(p["channel_mult"]))]


def _check_unet(p: Mapping[str, Any]) -> None:
    bad = [f"{k}={p[k]!r}" for k, v in _UNET_FIXED.items() if k in p and p[k] != v]
    if not isinstance(p.get("transformer_depth", 1), int) or p.get("disable_self_attentions"):
        bad.append("per-level transformer options")
    if bad:
        raise ValueError(f"unsupported UNet options for conversion: {', '.join(bad)}")


def _check_vae(dd: Mapping[str, Any], embed_dim: int | None) -> None:
    if dd.get("attn_resolutions") or not dd.get("double_z", True):
        raise ValueError("unsupported VAE: attn_resolutions must be [] and double_z true")
    if embed_dim is not None and embed_dim != dd["z_channels"]:
        raise ValueError(f"VAE embed_dim {embed_dim} != z_channels {dd['z_channels']}")


def unet_diffusers_config(unet_params: Mapping[str, Any], sample_size: int = 64) -> dict[str, Any]:
    """``UNet2DConditionModel`` config of a CompVis ``unet_config.params``. SD v1 quirk:
    diffusers' ``attention_head_dim`` holds the number of heads."""
    p = unet_params
    _check_unet(p)
    widths = [p["model_channels"] * m for m in p["channel_mult"]]
    attn = _attn_levels(p)
    heads = p.get("num_heads", -1)
    if heads in (-1, None):
        heads = [w // p["num_head_channels"] for w in widths]
    cfg = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "attention_head_dim": heads,
        "block_out_channels": widths,
        "center_input_sample": False,
        "cross_attention_dim": p["context_dim"],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": p["in_channels"],
        "layers_per_block": p["num_res_blocks"],
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-5,
        "norm_num_groups": 32,
        "out_channels": p["out_channels"],
        "sample_size": sample_size,
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
    }
    if p.get("use_linear_in_transformer"):
        cfg["use_linear_projection"] = True
    if p.get("transformer_depth", 1) != 1:
        cfg["transformer_layers_per_block"] = p["transformer_depth"]
    return cfg


def vae_diffusers_config(
    ddconfig: Mapping[str, Any],
    embed_dim: int | None = None,
    sample_size: int | None = None,
    scaling_factor: float = SD_SCALE_FACTOR,
) -> dict[str, Any]:
    """``AutoencoderKL`` config of a CompVis ``ddconfig`` (``sample_size`` in image pixels)."""
    _check_vae(ddconfig, embed_dim)
    n = len(ddconfig["ch_mult"])
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": [ddconfig["ch"] * m for m in ddconfig["ch_mult"]],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "in_channels": ddconfig["in_channels"],
        "latent_channels": ddconfig["z_channels"],
        "layers_per_block": ddconfig["num_res_blocks"],
        "norm_num_groups": 32,
        "out_channels": ddconfig["out_ch"],
        "sample_size": sample_size or ddconfig["resolution"],
        "scaling_factor": scaling_factor,
        "up_block_types": ["UpDecoderBlock2D"] * n,
    }


def text_encoder_config(text_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``CLIPTextConfig`` kwargs: the config's ``text_config`` (transformers defaults for the
    rest, as the model builds it), or SD v1's text tower when there is none."""
    base = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model"}
    return {**base, **(text_config or SD_TEXT_CONFIG)}


def scheduler_config(model_config: Any) -> dict[str, Any]:
    """SD's PNDM scheduler config (``steps_offset`` 1) with the model's beta schedule."""
    cfg = normalize_model_config(model_config)
    schedule = cfg.get("beta_schedule", "linear")
    if schedule not in SCHEDULES:
        raise ValueError(f"beta_schedule {schedule!r} has no diffusers equivalent")
    return {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_start": cfg.get("linear_start", 1e-4),
        "beta_end": cfg.get("linear_end", 2e-2),
        "beta_schedule": SCHEDULES[schedule],
        "num_train_timesteps": cfg.get("timesteps", 1000),
        "prediction_type": "epsilon",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
        "clip_sample": False,
    }


def diffusers_configs(model_config: Any, scale_factor: float | None = None) -> dict[str, dict]:
    """The ``unet`` / ``vae`` / ``text_encoder`` / ``scheduler`` config dicts of a folder."""
    cfg = normalize_model_config(model_config)
    unet_p, dd, embed_dim, text = _params(cfg)
    size = cfg.get("image_size", 64)  # latent size
    pixels = size * 2 ** (len(dd["ch_mult"]) - 1)
    scale = scale_factor if scale_factor is not None else cfg.get("scale_factor", SD_SCALE_FACTOR)
    return {
        "unet": unet_diffusers_config(unet_p, size),
        "vae": vae_diffusers_config(dd, embed_dim, pixels, scale),
        "text_encoder": text_encoder_config(text),
        "scheduler": scheduler_config(cfg),
    }


def model_config_from_diffusers(
    unet: Mapping[str, Any],
    vae: Mapping[str, Any],
    text: Mapping[str, Any],
    scheduler: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Our flat model config, derived back from a diffusers folder's config dicts.

    A VAE ``scaling_factor`` other than SD's is taken as trained: the config gets
    ``scale_factor: null`` and :func:`read_diffusers` puts the value in the weights."""
    widths, vw = list(unet["block_out_channels"]), list(vae["block_out_channels"])
    attn = [t.startswith("CrossAttn") for t in unet["down_block_types"]]
    bad = [k for k, v in _DIFFUSERS_UNET_FIXED.items() if unet.get(k, v) != v]
    bad += [k for k, v in _DIFFUSERS_VAE_FIXED.items() if vae.get(k, v) != v]
    if unet["up_block_types"] != ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]]:
        bad.append("up_block_types")
    if any(w % widths[0] for w in widths) or any(w % vw[0] for w in vw):
        bad.append("block_out_channels")
    if bad:
        raise ValueError(f"unsupported diffusers options: {', '.join(bad)}")
    heads = unet.get("attention_head_dim", 8)
    unet_params: dict[str, Any] = {
        "in_channels": unet["in_channels"],
        "out_channels": unet["out_channels"],
        "model_channels": widths[0],
        "num_res_blocks": unet["layers_per_block"],
        "attention_resolutions": [2**i for i, a in enumerate(attn) if a],
        "channel_mult": [w // widths[0] for w in widths],
        "num_heads": heads if isinstance(heads, int) else -1,
        "transformer_depth": unet.get("transformer_layers_per_block", 1),
        "context_dim": unet["cross_attention_dim"],
        "use_checkpoint": False,
    }
    if not isinstance(heads, int):
        unet_params["num_head_channels"] = widths[0] // heads[0]
    if unet.get("use_linear_projection"):
        unet_params["use_linear_in_transformer"] = True
    ddconfig = {
        "double_z": True,
        "z_channels": vae["latent_channels"],
        "in_channels": vae["in_channels"],
        "resolution": vae.get("sample_size", 256),
        "out_ch": vae["out_channels"],
        "ch": vw[0],
        "ch_mult": [w // vw[0] for w in vw],
        "num_res_blocks": vae["layers_per_block"],
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    sched = dict(scheduler or {})
    schedule = {v: k for k, v in SCHEDULES.items()}.get(sched.get("beta_schedule", "scaled_linear"))
    if schedule is None or sched.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(
            f"unsupported scheduler: {sched.get('beta_schedule')!r} schedule, "
            f"{sched.get('prediction_type')!r} prediction"
        )
    first_stage = {"embed_dim": vae["latent_channels"], "ddconfig": ddconfig}
    scale = vae.get("scaling_factor", SD_SCALE_FACTOR)
    text_config = {k: text[k] for k in TEXT_ARCH_KEYS if k in text}
    return {
        "_target_": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "linear_start": sched.get("beta_start", 0.00085),
        "linear_end": sched.get("beta_end", 0.012),
        "timesteps": sched.get("num_train_timesteps", 1000),
        "beta_schedule": schedule,
        "scale_factor": scale if scale == SD_SCALE_FACTOR else None,  # else: a buffer
        "image_size": unet.get("sample_size", 64),
        "unet_config": {
            "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": unet_params,
        },
        "first_stage_config": {
            "target": "ldm.models.autoencoder.AutoencoderKL",
            "params": first_stage,
        },
        "cond_stage_config": {
            "target": "ldm.modules.encoders.FrozenCLIPEmbedder",
            "params": {"text_config": text_config},
        },
    }


# ----------------------------------------------------------------------------------- key maps
_RES_UNET = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
)
_RES_VAE = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"))
_BLOCK_W = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v")
_BLOCK_WB = (
    "norm1",
    "norm2",
    "norm3",
    "ff.net.0.proj",
    "ff.net.2",
    "attn1.to_out.0",
    "attn2.to_out.0",
)
_VAE_ATTN = (
    ("norm", "group_norm"),
    ("q", "to_q"),
    ("k", "to_k"),
    ("v", "to_v"),
    ("proj_out", "to_out.0"),
)


def _leaf(pairs: Pairs, src: str, dst: str, names: tuple[str, ...] = ("weight", "bias")) -> None:
    pairs.extend((f"{src}.{n}", f"{dst}.{n}") for n in names)


def _resnet(pairs: Pairs, src: str, dst: str, c_in: int, c_out: int, vae: bool = False) -> None:
    for s, d in _RES_VAE if vae else _RES_UNET:
        _leaf(pairs, f"{src}.{s}", f"{dst}.{d}")
    if c_in != c_out:
        shortcut = "nin_shortcut" if vae else "skip_connection"
        _leaf(pairs, f"{src}.{shortcut}", f"{dst}.conv_shortcut")


def _transformer(pairs: Pairs, src: str, dst: str, depth: int) -> None:
    """SpatialTransformer and diffusers Transformer2DModel share their inner names."""
    for s in ("norm", "proj_in", "proj_out"):
        _leaf(pairs, f"{src}.{s}", f"{dst}.{s}")
    for b in (f"transformer_blocks.{i}" for i in range(depth)):
        for s in _BLOCK_W:  # q/k/v have no bias
            _leaf(pairs, f"{src}.{b}.{s}", f"{dst}.{b}.{s}", ("weight",))
        for s in _BLOCK_WB:
            _leaf(pairs, f"{src}.{b}.{s}", f"{dst}.{b}.{s}")


def unet_key_pairs(unet_params: Mapping[str, Any]) -> Pairs:
    """Every UNet parameter as (CompVis key without ``model.diffusion_model.``, diffusers key)."""
    _check_unet(unet_params)
    mc, mults = unet_params["model_channels"], unet_params["channel_mult"]
    nrb, depth = unet_params["num_res_blocks"], unet_params.get("transformer_depth", 1)
    attn, pairs = _attn_levels(unet_params), []
    _leaf(pairs, "time_embed.0", "time_embedding.linear_1")
    _leaf(pairs, "time_embed.2", "time_embedding.linear_2")
    _leaf(pairs, "input_blocks.0.0", "conv_in")
    ch, skips, idx = mc, [mc], 0
    for lvl, mult in enumerate(mults):
        for j in range(nrb):
            idx += 1
            src, dst = f"input_blocks.{idx}", f"down_blocks.{lvl}"
            _resnet(pairs, f"{src}.0", f"{dst}.resnets.{j}", ch, mc * mult)
            ch = mc * mult
            if attn[lvl]:
                _transformer(pairs, f"{src}.1", f"{dst}.attentions.{j}", depth)
            skips.append(ch)
        if lvl != len(mults) - 1:
            idx += 1
            _leaf(pairs, f"input_blocks.{idx}.0.op", f"down_blocks.{lvl}.downsamplers.0.conv")
            skips.append(ch)
    _resnet(pairs, "middle_block.0", "mid_block.resnets.0", ch, ch)
    _transformer(pairs, "middle_block.1", "mid_block.attentions.0", depth)
    _resnet(pairs, "middle_block.2", "mid_block.resnets.1", ch, ch)
    idx = 0
    for up, lvl in enumerate(reversed(range(len(mults)))):
        for j in range(nrb + 1):
            src, dst = f"output_blocks.{idx}", f"up_blocks.{up}"
            _resnet(pairs, f"{src}.0", f"{dst}.resnets.{j}", ch + skips.pop(), mc * mults[lvl])
            ch = mc * mults[lvl]
            if attn[lvl]:
                _transformer(pairs, f"{src}.1", f"{dst}.attentions.{j}", depth)
            if lvl and j == nrb:  # Upsample follows the attention block when there is one
                _leaf(pairs, f"{src}.{2 if attn[lvl] else 1}.conv", f"{dst}.upsamplers.0.conv")
            idx += 1
    _leaf(pairs, "out.0", "conv_norm_out")
    _leaf(pairs, "out.2", "conv_out")
    return pairs


def vae_key_pairs(ddconfig: Mapping[str, Any]) -> Pairs:
    """Every VAE parameter as (CompVis key without ``first_stage_model.``, diffusers key).
    CompVis ``decoder.up.i`` is diffusers ``decoder.up_blocks.{n - 1 - i}``."""
    _check_vae(ddconfig, None)
    ch, mults, nrb = ddconfig["ch"], ddconfig["ch_mult"], ddconfig["num_res_blocks"]
    n, pairs = len(mults), []
    for part in ("encoder", "decoder"):
        c, src, dst = ch * mults[-1], f"{part}.mid", f"{part}.mid_block"
        _leaf(pairs, f"{part}.conv_in", f"{part}.conv_in")
        _resnet(pairs, f"{src}.block_1", f"{dst}.resnets.0", c, c, vae=True)
        for s, d in _VAE_ATTN:
            _leaf(pairs, f"{src}.attn_1.{s}", f"{dst}.attentions.0.{d}")
        _resnet(pairs, f"{src}.block_2", f"{dst}.resnets.1", c, c, vae=True)
        _leaf(pairs, f"{part}.norm_out", f"{part}.conv_norm_out")
        _leaf(pairs, f"{part}.conv_out", f"{part}.conv_out")
    c_in = ch
    for i, mult in enumerate(mults):
        src, dst = f"encoder.down.{i}", f"encoder.down_blocks.{i}"
        for j in range(nrb):
            _resnet(pairs, f"{src}.block.{j}", f"{dst}.resnets.{j}", c_in, ch * mult, vae=True)
            c_in = ch * mult
        if i != n - 1:
            _leaf(pairs, f"{src}.downsample.conv", f"{dst}.downsamplers.0.conv")
    c_in = ch * mults[-1]
    for i in reversed(range(n)):
        src, dst = f"decoder.up.{i}", f"decoder.up_blocks.{n - 1 - i}"
        for j in range(nrb + 1):
            _resnet(pairs, f"{src}.block.{j}", f"{dst}.resnets.{j}", c_in, ch * mults[i], vae=True)
            c_in = ch * mults[i]
        if i != 0:
            _leaf(pairs, f"{src}.upsample.conv", f"{dst}.upsamplers.0.conv")
    _leaf(pairs, "quant_conv", "quant_conv")
    _leaf(pairs, "post_quant_conv", "post_quant_conv")
    return pairs


# -------------------------------------------------------------------------------- conversions
def _remap(sd: Tensors, pairs: Pairs, what: str, reshape: Callable | None = None) -> dict:
    """Rename ``sd`` by ``pairs`` (source, target); its keys must be exactly the sources."""
    src = dict(pairs)
    missing, unexpected = [s for s in src if s not in sd], [k for k in sd if k not in src]
    if missing or unexpected:
        summary = summarize_keys(missing, unexpected)
        raise ValueError(f"{what} weights do not match the config: {summary}")
    return {d: reshape(d, sd[s]) if reshape else sd[s] for s, d in pairs}


def _check_shape(sd: Tensors, key: str, shape: tuple[int, ...], what: str) -> None:
    if tuple(sd[key].shape[: len(shape)]) != shape:
        raise ValueError(f"{what}: {key} has shape {tuple(sd[key].shape)}, config needs {shape}")


def _prefixed(sd: Tensors, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if k.startswith(prefix)}


def unet_compvis_to_diffusers(sd: Tensors, unet_params: Mapping[str, Any]) -> dict:
    """CompVis ``model.diffusion_model.*`` keys (others ignored) -> ``UNet2DConditionModel``."""
    pairs = [(UNET_PREFIX + c, d) for c, d in unet_key_pairs(unet_params)]
    out = _remap(_prefixed(sd, UNET_PREFIX), pairs, "UNet")
    shape = (unet_params["model_channels"], unet_params["in_channels"])
    _check_shape(out, "conv_in.weight", shape, "UNet")
    return out


def unet_diffusers_to_compvis(sd: Tensors, unet_params: Mapping[str, Any]) -> dict:
    """``UNet2DConditionModel`` keys -> CompVis ``model.diffusion_model.*`` keys."""
    return _remap(sd, [(d, UNET_PREFIX + c) for c, d in unet_key_pairs(unet_params)], "UNet")


def _is_vae_attn_weight(key: str) -> bool:
    return ".mid_block.attentions.0.to_" in key and key.endswith(".weight")


def vae_compvis_to_diffusers(
    sd: Tensors, ddconfig: Mapping[str, Any], embed_dim: int | None = None
) -> dict:
    """CompVis ``first_stage_model.*`` -> ``AutoencoderKL`` (1x1-conv attention -> linear)."""
    _check_vae(ddconfig, embed_dim)
    pairs = [(VAE_PREFIX + c, d) for c, d in vae_key_pairs(ddconfig)]
    out = _remap(
        _prefixed(sd, VAE_PREFIX),
        pairs,
        "VAE",
        lambda k, v: v[:, :, 0, 0] if _is_vae_attn_weight(k) and v.ndim == 4 else v,
    )
    _check_shape(out, "encoder.conv_in.weight", (ddconfig["ch"], ddconfig["in_channels"]), "VAE")
    return out


def vae_diffusers_to_compvis(sd: Tensors, ddconfig: Mapping[str, Any]) -> dict:
    """``AutoencoderKL`` keys -> CompVis ``first_stage_model.*`` (linear -> 1x1-conv attention)."""
    pairs = [(d, VAE_PREFIX + c) for c, d in vae_key_pairs(ddconfig)]
    conv = {c for d, c in pairs if _is_vae_attn_weight(d)}
    return _remap(
        sd, pairs, "VAE", lambda k, v: v[:, :, None, None] if k in conv and v.ndim == 2 else v
    )


def text_compvis_to_diffusers(sd: Tensors) -> dict:
    """``cond_stage_model.transformer.*`` -> ``CLIPTextModel`` keys (``position_ids`` dropped)."""
    out = {
        k[len(TEXT_PREFIX) :]: v
        for k, v in _prefixed(sd, TEXT_PREFIX).items()
        if not k.endswith("position_ids")
    }
    if not out:
        raise ValueError(f"no text encoder weights ({TEXT_PREFIX}*) in the checkpoint")
    return out


def text_diffusers_to_compvis(sd: Tensors) -> dict:
    """``CLIPTextModel`` keys -> ``cond_stage_model.transformer.*`` (``position_ids`` dropped)."""
    return {TEXT_PREFIX + k: v for k, v in sd.items() if not k.endswith("position_ids")}


def ddpm_schedule_buffers(
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    timesteps: int = 1000,
    beta_schedule: str = "linear",
) -> dict[str, torch.Tensor]:
    """The 12 DDPM buffers as CompVis ``register_schedule`` (v_posterior 0) makes them: float64
    math, stored as float32. CompVis ``linear`` is linear in sqrt(beta)."""
    if beta_schedule not in SCHEDULES:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}")
    if beta_schedule == "linear":
        b = torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
    else:
        b = torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
    b = b.numpy()
    ac = np.cumprod(1.0 - b, axis=0)
    prev = np.append(1.0, ac[:-1])
    var = b * (1.0 - prev) / (1.0 - ac)
    values = (
        b,
        ac,
        prev,
        np.sqrt(ac),
        np.sqrt(1.0 - ac),
        np.log(1.0 - ac),
        np.sqrt(1.0 / ac),
        np.sqrt(1.0 / ac - 1),
        var,
        np.log(np.maximum(var, 1e-20)),
        b * np.sqrt(prev) / (1.0 - ac),
        (1.0 - prev) * np.sqrt(1.0 - b) / (1.0 - ac),
    )
    named = zip(DDPM_BUFFERS, values, strict=True)
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in named}


def _ema_unet(sd: Tensors) -> dict[str, torch.Tensor]:
    """``sd`` with the UNet weights replaced by their ``model_ema.*`` copies (LitEma names)."""
    out, missing = dict(sd), []
    for k in _prefixed(sd, UNET_PREFIX):
        ema = EMA_PREFIX + k[len("model.") :].replace(".", "")
        if ema in sd:
            out[k] = sd[ema]
        else:
            missing.append(k)
    if missing:
        raise ValueError(f"{len(missing)} UNet weights have no EMA copy (e.g. {missing[0]})")
    return out


def _scale_factor(sd: Tensors, cfg: Mapping[str, Any]) -> float:
    """The latent scale: a ``scale_factor`` buffer in the weights wins over the config's."""
    value = float(sd["scale_factor"]) if "scale_factor" in sd else cfg.get("scale_factor")
    if value is None or math.isnan(value):
        raise ValueError("scale_factor is unknown (null in the config, unset in the weights)")
    return float(value)


def compvis_to_diffusers(sd: Tensors, model_config: Any, *, use_ema: bool = False) -> dict:
    """Split a CompVis state dict into ``{"unet", "vae", "text_encoder"}`` diffusers state dicts.
    DDPM buffers, ``model_ema.*`` and ``scale_factor`` are dropped (configs carry them)."""
    unet_p, dd, embed_dim, _ = _params(normalize_model_config(model_config))
    if use_ema:
        sd = _ema_unet(sd)
    known = (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX, EMA_PREFIX, "scale_factor", *DDPM_BUFFERS)
    extra = [k for k in sd if not k.startswith(known)]
    if extra:
        log.warning("dropping keys outside the model: %s", summarize_keys([], extra))
    return {
        "unet": unet_compvis_to_diffusers(sd, unet_p),
        "vae": vae_compvis_to_diffusers(sd, dd, embed_dim),
        "text_encoder": text_compvis_to_diffusers(sd),
    }


def diffusers_to_compvis(
    parts: Mapping[str, Tensors], model_config: Any, *, scale_factor: float | None = None
) -> dict[str, torch.Tensor]:
    """Join diffusers ``unet`` / ``vae`` / ``text_encoder`` state dicts into one CompVis dict,
    adding the config schedule's DDPM buffers, and a ``scale_factor`` buffer when the config's
    ``scale_factor`` is null (pass the VAE's ``scaling_factor`` as ``scale_factor`` then)."""
    cfg = normalize_model_config(model_config)
    unet_p, dd, _, _ = _params(cfg)
    out = {
        **unet_diffusers_to_compvis(parts["unet"], unet_p),
        **vae_diffusers_to_compvis(parts["vae"], dd),
        **text_diffusers_to_compvis(parts["text_encoder"]),
    }
    schedule = (
        cfg.get("linear_start", 1e-4),
        cfg.get("linear_end", 2e-2),
        cfg.get("timesteps", 1000),
        cfg.get("beta_schedule", "linear"),
    )
    out.update(ddpm_schedule_buffers(*schedule))
    if "scale_factor" in cfg and cfg["scale_factor"] is None:
        if scale_factor is None:
            raise ValueError("the config's scale_factor is null: pass scale_factor")
        out["scale_factor"] = torch.tensor(float(scale_factor))
    return out


# ---------------------------------------------------------------------------- diffusers folders
_WEIGHTS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _write_json(path: Path, obj: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _nonempty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def write_diffusers(
    sd: Tensors,
    model_config: Any,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    use_ema: bool = False,
) -> Path:
    """Write a CompVis state dict as a diffusers ``StableDiffusionPipeline`` folder.

    The folder is built under a temporary sibling name and renamed into place at the end; an
    existing non-empty ``out_dir`` is an error unless ``overwrite``."""
    out = Path(out_dir)
    if _nonempty(out) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (use --overwrite to replace it)")
    cfg = normalize_model_config(model_config)
    configs = diffusers_configs(cfg, _scale_factor(sd, cfg))
    parts = compvis_to_diffusers(sd, cfg, use_ema=use_ema)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, weights in parts.items():
            save_state_dict(weights, tmp / name / f"{_WEIGHTS[name]}.safetensors")
            _write_json(tmp / name / "config.json", configs[name])
        _write_json(tmp / "scheduler" / "scheduler_config.json", configs["scheduler"])
        _write_json(tmp / "model_index.json", MODEL_INDEX)
        if TOKENIZER_DIR.is_dir():
            shutil.copytree(TOKENIZER_DIR, tmp / "tokenizer")
        else:
            log.warning("no tokenizer in %s: tokenizer/ not written", TOKENIZER_DIR)
        tmp.chmod(0o755)
        old = out.with_name(f".{out.name}.old") if out.exists() else None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)  # left over from an interrupted run
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _load_part(folder: Path, stem: str) -> dict[str, torch.Tensor]:
    """``stem.safetensors`` / ``stem.bin`` of a component folder, or their sharded index."""
    for ext in ("safetensors", "bin"):
        if (folder / f"{stem}.{ext}").exists():
            return load_state_dict(folder / f"{stem}.{ext}")
        index = folder / f"{stem}.{ext}.index.json"
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for s in shards for k, v in load_state_dict(folder / s).items()}
    raise FileNotFoundError(f"no {stem}.safetensors or {stem}.bin in {folder}")


def read_diffusers(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A diffusers SD folder -> (CompVis state dict, model config derived from its configs)."""
    root = Path(path)
    configs: dict[str, Any] = {}
    for name in (*_WEIGHTS, "scheduler"):
        file = root / name / ("scheduler_config.json" if name == "scheduler" else "config.json")
        if not file.exists() and name != "scheduler":
            raise FileNotFoundError(f"{root} is not a diffusers SD folder: {file} is missing")
        configs[name] = json.loads(file.read_text()) if file.exists() else None
    cfg = model_config_from_diffusers(
        configs["unet"], configs["vae"], configs["text_encoder"], configs["scheduler"]
    )
    parts = {name: _load_part(root / name, stem) for name, stem in _WEIGHTS.items()}
    scale = configs["vae"].get("scaling_factor", SD_SCALE_FACTOR)
    return diffusers_to_compvis(parts, cfg, scale_factor=scale), cfg


# ---------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """``python -m ldm.convert``; prints the written path, or one error line and returns 1."""
    ap = argparse.ArgumentParser(prog="python -m ldm.convert", description=__doc__.split("\n")[0])
    ap.add_argument("--to", choices=("diffusers", "compvis"), required=True)
    ap.add_argument("src", help="CompVis .ckpt/.safetensors, or a diffusers folder (--to compvis)")
    ap.add_argument("out", help="diffusers folder, or .safetensors/.ckpt file (--to compvis)")
    ap.add_argument("--config", default="sd15", help="model config: name in configs/model or YAML")
    ap.add_argument("--ema", action="store_true", help="export the model_ema.* UNet weights")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.to == "diffusers":
            from ldm import resolve_model_config

            cfg = resolve_model_config(args.config)
            sd = load_state_dict(args.src)
            out = write_diffusers(sd, cfg, args.out, overwrite=args.overwrite, use_ema=args.ema)
        else:
            src, out = Path(args.src), Path(args.out)
            if not src.is_dir():
                raise ValueError(f"{src}: --to compvis expects a diffusers folder")
            if _nonempty(out) and not args.overwrite:
                raise FileExistsError(f"{out} exists (use --overwrite to replace it)")
            save_state_dict(read_diffusers(src)[0], out)
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        print(f"error: {lines[0]}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
