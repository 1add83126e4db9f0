"""Our core vs diffusers on the full SD-1.5 architecture with the same random weights.

Measures:
- UNet forward+backward (batch 1, 256 px -> 32x32 latents, all parameters trainable);
- 50-step DDIM with classifier-free guidance (scale 7.5), text encoding and VAE decode included.

Speed: both implementations are loaded in ONE process and called alternately (``--rounds``
rounds, the order flipped every round), and each one's best time counts, so load drift on a
shared machine hits both alike. (Separate processes per implementation measured up to 5% apart
in either direction from run to run.) Memory: the peak RSS of a UNet forward+backward, each
implementation in a fresh process so the peaks do not mix.
Last stdout line: JSON with ``unet_fwd_bwd_speedup`` and ``sampling_speedup`` (diffusers time /
our time) and ``peak_mem_ratio`` (our peak RSS / diffusers' during fwd+bwd).

    python bench/core_speed.py [--threads 1] [--iters 3] [--steps 50] [--rounds 2]
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


def load(kind: str, workdir: Path):
    if kind == "ours":
        from ldm import load_model

        model = load_model(workdir / "sd15_random.safetensors", "sd15")
        model.image_size = 32  # 256 px
        return model
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        workdir / "diffusers", safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_step(kind: str, impl):
    """A closure running one UNet forward+backward of ``impl`` (all parameters trainable)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 32, 32, generator=g)
    ctx = torch.randn(1, 77, 768, generator=g)
    t = torch.tensor([500])
    if kind == "ours":
        unet = impl.model.diffusion_model
        unet.train().requires_grad_(True)

        def step() -> None:
            unet(x, t, context=ctx).square().mean().backward()
            unet.zero_grad(set_to_none=True)

        return step
    unet = impl.unet
    unet.train().requires_grad_(True)

    def step() -> None:
        unet(x, t, encoder_hidden_states=ctx).sample.square().mean().backward()
        unet.zero_grad(set_to_none=True)

    return step


def sampler(kind: str, impl, steps: int):
    if kind == "ours":
        from ldm.generate import generate

        return lambda: generate(impl, [PROMPT], steps=steps, guidance_scale=7.5, progress=False)
    return lambda: impl(
        PROMPT,
        height=256,
        width=256,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )


def speed_child(workdir: Path, iters: int, steps: int, rounds: int) -> dict:
    """Both implementations in this process, called alternately; best time of each."""
    impls = {k: load(k, workdir) for k in ("diffusers", "ours")}
    times: dict[str, list[float]] = {f"{k}_{what}": [] for k in impls for what in ("fb", "sample")}
    for r in range(rounds):
        order = list(impls) if r % 2 == 0 else list(impls)[::-1]
        for k in order:
            # UNet fwd+bwd first (sampling runs with eval/no-grad)...
            times[f"{k}_fb"].append(timed(unet_step(k, impls[k]), iters))
        for k in order:
            if k == "ours":
                impls[k].eval()
            else:
                impls[k].unet.eval()
            with torch.no_grad():
                times[f"{k}_sample"].append(timed(sampler(k, impls[k], steps), 1, warmup=0))
    return {k: min(v) for k, v in times.items()} | {"all": times}


def memory_child(kind: str, workdir: Path, iters: int) -> dict:
    """Peak RSS of a UNet forward+backward, this implementation's UNet alone in a fresh process.

    Only the UNet is kept: diffusers maps its safetensors lazily, so the untouched VAE and text
    encoder of a whole pipeline would not count on its side but would on ours."""
    import gc

    impl = load(kind, workdir)
    step = unet_step(kind, impl)
    if kind == "ours":
        impl.first_stage_model, impl.cond_stage_model = None, None
    else:
        impl.vae, impl.text_encoder = None, None
    gc.collect()
    reset_peak_rss()
    for _ in range(iters):
        step()
    return {"peak_mb": peak_rss_mb()}


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
    if args.child == "speed":
        print(json.dumps(speed_child(Path(args.workdir), args.iters, args.steps, args.rounds)))
        return
    if args.child:
        print(json.dumps(memory_child(args.child, Path(args.workdir), args.iters)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        make_weights(workdir)
        common = ["--workdir", tmp, "--threads", str(args.threads), "--iters", str(args.iters)]
        me = Path(__file__)
        mem = {k: run_child(me, ["--child", k, *common]) for k in ("diffusers", "ours")}
        speed = run_child(me, ["--child", "speed", *common, "--steps", str(args.steps),
                               "--rounds", str(args.rounds)])  # fmt: skip
    out = {
        "unet_fwd_bwd_speedup": speed["diffusers_fb"] / speed["ours_fb"],
        "sampling_speedup": speed["diffusers_sample"] / speed["ours_sample"],
        "peak_mem_ratio": mem["ours"]["peak_mb"] / mem["diffusers"]["peak_mb"],
        "ours_unet_fwd_bwd_s": speed["ours_fb"],
        "diffusers_unet_fwd_bwd_s": speed["diffusers_fb"],
        "ours_sampling_s": speed["ours_sample"],
        "diffusers_sampling_s": speed["diffusers_sample"],
        "ours_peak_mb": mem["ours"]["peak_mb"],
        "diffusers_peak_mb": mem["diffusers"]["peak_mb"],
        "all_times_s": speed["all"],
        "threads": args.threads,
        "rounds": args.rounds,
        "steps": args.steps,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
