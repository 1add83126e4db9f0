"""One Custom Diffusion training step: ours vs diffusers' own training example, same weights.

A step is text encoding with a new token's row trainable, VAE encoding (frozen), the UNet with
the cross-attention K/V trainable and the start token's K/V detached, the masked epsilon loss,
backward and an AdamW update. Ours is ``custom.model.CustomDiffusion.shared_step``; diffusers'
is built from its components as ``examples/custom_diffusion/train_custom_diffusion.py`` does:
``CustomDiffusionAttnProcessor2_0`` on every attention layer (K/V copies trainable on the
cross-attention ones), the whole token table trainable with the other rows' gradients zeroed.
Full SD-1.5 architecture with seeded random weights, 256 px, batch 1, CPU; each implementation
runs in fresh processes, alternating over ``--rounds``, and the best median time counts.
Last stdout line: JSON with ``step_speedup`` (diffusers time / ours) and ``peak_mem_ratio``
(our peak RSS / diffusers' during the steps).

    python bench/custom_speed.py [--threads 2] [--iters 3] [--rounds 2]
    python bench/custom_speed.py --tiny      # the tiny test model at 32 px: a wiring check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench._util import peak_rss_mb, reset_peak_rss, run_child, timed  # noqa: E402
from ldm.precision import parse_dtype  # noqa: E402

TOKEN, INIT_ID = "<new1>", 42170  # the reference's first modifier token and its init row
PROMPT = f"photo of a {TOKEN} dog"
LR = 1e-5
PRECISIONS = ("fp32", "bf16")  # each side runs both


def make_weights(workdir: Path, config: str) -> None:
    """Seeded random weights of ``config``, written once in both layouts."""
    from ldm import build_model, resolve_model_config
    from ldm.checkpoint import save_state_dict
    from ldm.convert import write_diffusers

    cfg = resolve_model_config(config)
    torch.manual_seed(0)
    model = build_model(cfg, ckpt=None)
    for p in model.model.parameters():  # CompVis zero-initialises output convs
        if not p.abs().sum():
            torch.nn.init.normal_(p, std=0.02)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    del model
    save_state_dict(sd, workdir / "base.safetensors")
    write_diffusers(sd, cfg, workdir / "diffusers")


def batch(pixels: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.rand(1, pixels, pixels, 3, generator=g) * 2 - 1,
        "mask": torch.ones(1, pixels, pixels),
        "caption": [PROMPT],
    }


def ours(workdir: Path, config: str, pixels: int, iters: int, precision: str) -> dict:
    from ldm import build_model

    model = build_model(
        config,
        _target_="custom.model.CustomDiffusion",
        modifier_tokens=[TOKEN],
        initializer_ids=[[INIT_ID]],
        ckpt=str(workdir / "base.safetensors"),
        frozen_dtype=precision,
    ).train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=LR, weight_decay=0.01)
    data = batch(pixels)

    def step() -> None:
        loss, _ = model.shared_step(data)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak_rss()
    sec = timed(step, iters)
    trainable = sum(p.numel() for p in model.trainable_parameters())
    return {"sec": sec, "peak_mb": peak_rss_mb(), "trainable": trainable}


def diffusers_step(workdir: Path, pixels: int, iters: int, precision: str) -> dict:
    """diffusers' train_custom_diffusion.py step (defaults: crossattn_kv, no prior loss).

    ``precision="bf16"`` is its ``--mixed_precision bf16``: the text encoder (token table
    included), UNet and VAE cast to bf16, the K/V copies fp32, the step under autocast."""
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders import AttnProcsLayers
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = workdir / "diffusers"
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    tokenizer.add_tokens([TOKEN])
    token_id = tokenizer.convert_tokens_to_ids(TOKEN)
    text_encoder.resize_token_embeddings(len(tokenizer))
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[token_id] = table[INIT_ID]
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    weight_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    text_encoder.to(dtype=weight_dtype)
    unet.to(dtype=weight_dtype)
    vae.to(dtype=weight_dtype)
    for part in (
        text_encoder.text_model.encoder,
        text_encoder.text_model.final_layer_norm,
        text_encoder.text_model.embeddings.position_embedding,
    ):
        part.requires_grad_(False)
    procs = {}
    weights = unet.state_dict()
    for name in unet.attn_processors:
        cross = not name.endswith("attn1.processor")
        if not cross:
            procs[name] = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False)
            continue
        layer = name[: -len(".processor")]
        k = weights[f"{layer}.to_k.weight"]
        procs[name] = CustomDiffusionAttnProcessor2_0(
            train_kv=True, train_q_out=False, hidden_size=k.shape[0], cross_attention_dim=k.shape[1]
        )
        procs[name].load_state_dict(
            {
                "to_k_custom_diffusion.weight": k,
                "to_v_custom_diffusion.weight": weights[f"{layer}.to_v.weight"],
            }
        )
    unet.set_attn_processor(procs)
    layers = AttnProcsLayers(unet.attn_processors)
    params = list(text_encoder.get_input_embeddings().parameters()) + list(layers.parameters())
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    unet.train(), text_encoder.train()
    data = batch(pixels)
    pixel_values = data["image"].permute(0, 3, 1, 2).to(weight_dtype)
    ids = tokenizer(PROMPT, padding="max_length", truncation=True, max_length=77,
                    return_tensors="pt").input_ids  # fmt: skip
    others = torch.arange(len(tokenizer)) != token_id

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> None:
        with autocast:  # accelerate's autocast around the whole step, as in the example
            latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (1,))
            noisy = scheduler.add_noise(latents, noise, t)
            context = text_encoder(ids)[0]
            pred = unet(noisy, t, context).sample
            mask = torch.ones_like(pred)
            loss = F.mse_loss(pred.float(), noise.float(), reduction="none") * mask
            loss = (loss.sum([1, 2, 3]) / mask.sum([1, 2, 3])).mean()
        loss.backward()
        table.grad[others] = 0  # only the new token's row learns
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak_rss()
    sec = timed(step, iters)
    trainable = sum(p.numel() for p in params)
    return {"sec": sec, "peak_mb": peak_rss_mb(), "trainable": trainable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="tiny model at 32 px (a check)")
    parser.add_argument("--child", default=None)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config, pixels = ("tiny", 32) if args.tiny else ("sd15", 256)
    if args.child:
        workdir = Path(args.workdir)
        impl, precision = args.child.split("-")
        if impl == "ours":
            res = ours(workdir, config, pixels, args.iters, precision)
        else:
            res = diffusers_step(workdir, pixels, args.iters, precision)
        print(json.dumps(res))
        return
    with tempfile.TemporaryDirectory() as tmp:
        make_weights(Path(tmp), config)
        common = ["--workdir", tmp, "--threads", str(args.threads), "--iters", str(args.iters)]
        common += ["--tiny"] if args.tiny else []
        kinds = tuple(f"{i}-{p}" for p in PRECISIONS for i in ("diffusers", "ours"))
        runs: dict[str, list[dict]] = {k: [] for k in kinds}
        for r in range(args.rounds):
            for k in kinds if r % 2 == 0 else kinds[::-1]:
                runs[k].append(run_child(Path(__file__), ["--child", k, *common]))
    best = {k: min(v, key=lambda d: d["sec"]) for k, v in runs.items()}
    for k, v in best.items():
        print(k, json.dumps(v))
    # Headline: each at its default precision. Ours is `frozen_dtype: auto` (bf16 on this
    # AMX-BF16 CPU), diffusers' example defaults to `--mixed_precision no` (fp32).
    ours_default = "bf16" if parse_dtype("auto") else "fp32"
    out = {
        "step_speedup": best["diffusers-fp32"]["sec"] / best[f"ours-{ours_default}"]["sec"],
        "peak_mem_ratio": best[f"ours-{ours_default}"]["peak_mb"]
        / best["diffusers-fp32"]["peak_mb"],
        "ours_precision": ours_default,
        "diffusers_precision": "fp32",
    }
    for p in PRECISIONS:  # like for like
        out[f"step_speedup_{p}"] = best[f"diffusers-{p}"]["sec"] / best[f"ours-{p}"]["sec"]
        mem = best[f"ours-{p}"]["peak_mb"] / best[f"diffusers-{p}"]["peak_mb"]
        out[f"peak_mem_ratio_{p}"] = mem
    for k, v in best.items():
        out[f"{k}_step_s"] = v["sec"]
        out[f"{k}_peak_mb"] = v["peak_mb"]
    out.update(
        ours_trainable=best["ours-fp32"]["trainable"],
        diffusers_trainable=best["diffusers-fp32"]["trainable"],
        config=config,
        pixels=pixels,
        threads=args.threads,
        iters=args.iters,
        rounds=args.rounds,
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
