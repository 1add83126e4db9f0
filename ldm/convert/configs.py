"""Model configs for the CompVis <-> diffusers conversion.

Normalises a model config (our flat form, a CompVis YAML, a Hydra root config) and derives the
diffusers ``unet`` / ``vae`` / ``text_encoder`` / ``scheduler`` configs from it, or our config
back from a diffusers folder's configs; also makes the DDPM schedule buffers the CompVis
weights carry. Only the options whose other values keep the weights' layout are accepted.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ldm.modules.encoders.clip import SD_V1_TEXT_CONFIG

DIFFUSERS_VERSION = "0.39.0"  # written into the configs we produce
SD_SCALE_FACTOR = 0.18215
# SD v1's text tower (openai/clip-vit-large-patch14) as in SD 1.5's text_encoder/config.json.
SD_TEXT_CONFIG: dict[str, Any] = {
    **SD_V1_TEXT_CONFIG,
    # the rest of SD 1.5's text_encoder/config.json (defaults that never change the weights)
    "layer_norm_eps": 1e-5,
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
