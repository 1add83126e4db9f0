"""State-dict key maps and conversions between the CompVis layout and diffusers models.

Key maps are generated from the CompVis model config (``unet_config.params``,
``first_stage_config.params.ddconfig``), so any size works, not just SD's. Tensors are renamed,
never copied; only the VAE mid-block attention changes shape (1x1 conv <-> linear, as views).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ldm.checkpoint import summarize_keys
from ldm.convert.configs import (
    _attn_levels,
    _check_unet,
    _check_vae,
    _params,
    normalize_model_config,
)
from ldm.modules.diffusionmodules.schedule import DDPM_BUFFERS, ddpm_schedule_buffers

log = logging.getLogger("ldm.convert")  # the package's logger name, as before the split

Tensors = Mapping[str, torch.Tensor]
Pairs = list[tuple[str, str]]  # (CompVis key, diffusers key)
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
TEXT_PREFIX, EMA_PREFIX = "cond_stage_model.transformer.", "model_ema."


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
