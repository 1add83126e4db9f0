"""Our core vs diffusers on the full SD-1.5 architecture with the same random weights.

Measures, each implementation in a fresh process so memory peaks don't mix:
- UNet forward+backward (batch 1, 256 px -> 32x32 latents, all parameters trainable);
- 50-step DDIM with classifier-free guidance (scale 7.5), text encoding and VAE decode included.
Each implementation runs in ``--rounds`` alternating rounds; the best time of each counts.
Last stdout line: JSON with ``unet_fwd_bwd_speedup`` and ``sampling_speedup`` (diffusers time /
our time) and ``peak_mem_ratio`` (our peak RSS / diffusers' during fwd+bwd).

    python bench/core_speed.py [--threads 2] [--iters 3] [--steps 50]
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

SD15 = ROOT.parent / "shared" / "data" / "sd15_configs"
PROMPT = "a photo of a dog on the beach"


def make_weights(workdir: Path) -> None:
    """Seeded random SD-1.5 weights, written once in both layouts."""
    from ldm import resolve_model_config
    from ldm.checkpoint import load_state_dict, save_state_dict
    from ldm.convert import write_diffusers

    cfg = resolve_model_config("sd15")
    model_sd = _random_compvis(cfg)
    save_state_dict(model_sd, workdir / "sd15_random.safetensors")
    write_diffusers(model_sd, cfg, workdir / "diffusers")
    del model_sd
    assert load_state_dict(workdir / "sd15_random.safetensors")


def _random_compvis(cfg: dict) -> dict:
    from ldm import build_model

    torch.manual_seed(0)
    model = build_model(cfg, ckpt=None)
    # CompVis zero-initialises output convs; randomise them so outputs are non-trivial.
    for p in model.model.parameters():
        if not p.abs().sum():
            torch.nn.init.normal_(p, std=0.02)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def child(kind: str, workdir: Path, iters: int, steps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 32, 32, generator=g)
    ctx = torch.randn(1, 77, 768, generator=g)
    t = torch.tensor([500])
    if kind == "ours-unet":
        from ldm import load_model

        unet = load_model(workdir / "sd15_random.safetensors", "sd15").model.diffusion_model
        unet.train().requires_grad_(True)
        reset_peak_rss()
        sec = timed(lambda: unet(x, t, context=ctx).square().mean().backward(), iters)
        return {"sec": sec, "peak_mb": peak_rss_mb()}
    if kind == "diffusers-unet":
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(workdir / "diffusers" / "unet").train()
        reset_peak_rss()
        sec = timed(
            lambda: unet(x, t, encoder_hidden_states=ctx).sample.square().mean().backward(), iters
        )
        return {"sec": sec, "peak_mb": peak_rss_mb()}
    if kind == "ours-sample":
        from ldm import load_model
        from ldm.generate import generate

        model = load_model(workdir / "sd15_random.safetensors", "sd15")
        model.image_size = 32  # 256 px
        sec = timed(
            lambda: generate(model, [PROMPT], steps=steps, guidance_scale=7.5, progress=False),
            iters=1,
            warmup=0,
        )
        return {"sec": sec}
    if kind == "diffusers-sample":
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            workdir / "diffusers", safety_checker=None, requires_safety_checker=False
        )
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        sec = timed(
            lambda: pipe(
                PROMPT,
                height=256,
                width=256,
                num_inference_steps=steps,
                guidance_scale=7.5,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            ),
            iters=1,
            warmup=0,
        )
        return {"sec": sec}
    raise ValueError(kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", default=None)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, Path(args.workdir), args.iters, args.steps)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        make_weights(workdir)
        common = [
            "--workdir",
            tmp,
            "--threads",
            str(args.threads),
            "--iters",
            str(args.iters),
            "--steps",
            str(args.steps),
        ]
        me = Path(__file__)
        # Alternate the implementations over rounds and keep each one's best time, so a burst of
        # load on the shared machine does not decide the ratio.
        kinds = ("diffusers-unet", "ours-unet", "diffusers-sample", "ours-sample")
        runs: dict[str, list[dict]] = {k: [] for k in kinds}
        for r in range(args.rounds):
            for k in kinds if r % 2 == 0 else kinds[::-1]:
                runs[k].append(run_child(me, ["--child", k, *common]))
        res = {k: min(v, key=lambda d: d["sec"]) for k, v in runs.items()}
    out = {
        "unet_fwd_bwd_speedup": res["diffusers-unet"]["sec"] / res["ours-unet"]["sec"],
        "sampling_speedup": res["diffusers-sample"]["sec"] / res["ours-sample"]["sec"],
        "peak_mem_ratio": res["ours-unet"]["peak_mb"] / res["diffusers-unet"]["peak_mb"],
        "ours_unet_fwd_bwd_s": res["ours-unet"]["sec"],
        "diffusers_unet_fwd_bwd_s": res["diffusers-unet"]["sec"],
        "ours_sampling_s": res["ours-sample"]["sec"],
        "diffusers_sampling_s": res["diffusers-sample"]["sec"],
        "ours_peak_mb": res["ours-unet"]["peak_mb"],
        "diffusers_peak_mb": res["diffusers-unet"]["peak_mb"],
        "threads": args.threads,
        "rounds": args.rounds,
        "steps": args.steps,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
