"""ViCo on the toy base: does a reference image of a novel concept put the concept in "a *"?

For each concept (never drawn in pretraining, ``toyworld/concepts.py``): train ViCo with the
``finetune_vico`` recipe on the concept's 6 example images (``main.py`` in a child process), then
sample "a *" x ``--samples`` seeds (DDIM 50, guidance 5, the toy base's) with a *held-out* image of
the concept as the visual condition, and ask the toy judge whether the concept is there. Baselines
from the same seeds: the base model on "a *" and on "a <class word>", and the trained token
without the visual condition. The judge's hit rate on autoencoder reconstructions of held-out
concept images is the ceiling (the f=4 autoencoder erases the dotted and striped concepts: 0% and
12%, so only ``twotone_square``, ``twotone_ring`` and ``outlined_triangle`` can be measured).

Last stdout line: JSON with ``concept_rate`` (ViCo, mean over concepts), ``base_rate`` (base on
"a *"), ``step_cost_ratio`` (ViCo sampling step time / plain, same batch and guidance), and the
details.

Training settings are the toy recipe's (batch 4, 600 steps, image blocks at 3e-4, token at
5e-3 x 4); ``method/vico.yaml`` keeps the reference's (batch 1, 400 steps, blocks at 1e-5). With the
reference's block lr, or batch 1 x 400 steps, or 400 steps at batch 4, the small toy blocks stay
too close to their random init (twotone_square: 0.0, 0.28, 0.44). The block lr was chosen on
twotone_square (32 samples: 1e-4: 0.75, 3e-4: 1.0; 1e-3: 0.38 on 8); the other two concepts
are held out.
Default: one concept, about 9 minutes on one shared CPU thread; the three measurable ones: 25.

    python bench/toy_vico.py [--concepts twotone_square] [--samples 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench._util import timed  # noqa: E402
from ldm import load_model, resolve_model_config  # noqa: E402
from ldm.generate import generate  # noqa: E402
from ldm.image_io import from_pil, make_grid, to_pil  # noqa: E402
from toyworld.concepts import CONCEPTS, concept_images  # noqa: E402
from toyworld.judge import Judge  # noqa: E402
from vico import sampling  # noqa: E402
from vico.formats import apply_vico, model_overrides, read_vico  # noqa: E402

GUIDANCE = 5.0  # the toy base's shipped guidance scale (model card)
SEED = 1000
HELD_OUT_SEED = 100  # reference images: not among the training images (seed 0)
PROMPT = "a *"
log = logging.getLogger("toy_vico")


def train(concept: str, out: Path, args: argparse.Namespace) -> Path:
    """Run the recipe; returns the checkpoint (skipped when it exists)."""
    ckpt = out / "checkpoints" / "last.safetensors"
    if ckpt.exists() and not args.retrain:
        log.info("%s exists, not training again (--retrain to do so)", ckpt)
        return ckpt
    cmd = [sys.executable, str(ROOT / "main.py"), "--config-name", "finetune_vico",
           f"hydra.run.dir={out}", f"prepare.concept.name={concept}",
           f"model.init_word={CONCEPTS[concept].class_word}", f"trainer.max_steps={args.steps}",
           f"data.batch_size={args.batch}", f"model.block_lr={args.block_lr}",
           f"seed={args.seed}", "callbacks.log_samples.steps=20"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    with open(out.parent / f"{concept}_train.log", "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"training {concept} failed: see {out.parent / f'{concept}_train.log'}")
    log.info("trained %s in %.0f s", concept, time.perf_counter() - start)
    return ckpt


def sample(model, prompt: str, n: int, image=None) -> torch.Tensor:
    """``n`` images of ``prompt`` (seeds SEED..), with ``image`` as the visual condition."""
    cfg = {"image": image} if image is not None else None
    with sampling.condition(model, cfg, [prompt] * n, SEED):
        return generate(model, [prompt] * n, steps=50, guidance_scale=GUIDANCE, seed=SEED,
                        progress=False)  # fmt: skip


def step_time(model, image, n: int, steps: int = 10) -> float:
    """Seconds per sampling step (DDIM, CFG, batch ``n``), median of 3 runs."""
    cfg = {"image": image} if image is not None else None

    def run() -> None:
        with sampling.condition(model, cfg, [PROMPT] * n, SEED):
            generate(model, [PROMPT] * n, steps=steps, guidance_scale=GUIDANCE, progress=False)

    return timed(run, iters=3) / steps


def evaluate(concept: str, out: Path, base, judge: Judge, args) -> dict:
    ckpt = train(concept, out / concept, args)
    tensors, meta = read_vico(ckpt)
    model = load_model(None, {**resolve_model_config("toy"), **model_overrides(meta)})
    apply_vico(model, tensors, str(ckpt))
    ref_path = out / f"{concept}_reference.png"
    held_out = concept_images(concept, 9, 32, seed=HELD_OUT_SEED)
    held_out[0].save(ref_path)
    with torch.no_grad():
        x = from_pil(held_out)
        z = model.get_first_stage_encoding(model.encode_first_stage(x))
        recon = model.decode_first_stage(z)
    ceiling = judge.has_concept(recon, concept).float().mean().item()

    def rate(images: torch.Tensor) -> float:
        return round(judge.has_concept(images * 2 - 1, concept).float().mean().item(), 4)

    vico = sample(model, PROMPT, args.samples, ref_path)
    token_only = sample(model, PROMPT, args.samples)
    base_star = sample(base, PROMPT, args.samples)
    base_class = sample(base, f"a {CONCEPTS[concept].class_word}", args.samples)
    # Other held-out references (one image each, same seeds): does it hold beyond one picture?
    per_ref = [rate(sample(model, PROMPT, args.samples // 4, p)) for p in held_out[1:4]]
    # Rows: ViCo, the token alone, the base on "a *", the base on "a <class word>".
    rows = [t[:12] for t in (vico, token_only, base_star, base_class)]
    make_grid(to_pil(torch.cat(rows)), ncols=12).save(out / f"{concept}_grid.png")
    return {
        "concept": concept,
        "description": CONCEPTS[concept].description,
        "concept_rate": rate(vico),
        "token_only_rate": rate(token_only),
        "base_rate": rate(base_star),
        "base_class_word_rate": rate(base_class),
        "other_reference_rates": per_ref,
        "judge_ceiling_recon": round(ceiling, 4),
        "model": model,
        "reference": ref_path,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", nargs="+", default=["twotone_square"], choices=CONCEPTS)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block-lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timing-batch", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "bench" / "toy_vico")
    parser.add_argument("--retrain", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    judge = Judge.load()
    base = load_model(None, "toy")
    results = [evaluate(c, args.out, base, judge, args) for c in args.concepts]
    model, ref = results[0]["model"], results[0]["reference"]
    t_vico = step_time(model, ref, args.timing_batch)
    t_plain = step_time(base, None, args.timing_batch)
    for r in results:
        r.pop("model")
        r.pop("reference")
        log.info("%s", r)

    def mean(key: str) -> float:
        return round(sum(r[key] for r in results) / len(results), 4)

    out = {
        "concept_rate": mean("concept_rate"),
        "base_rate": mean("base_rate"),
        "step_cost_ratio": round(t_vico / t_plain, 3),
        "token_only_rate": mean("token_only_rate"),
        "base_class_word_rate": mean("base_class_word_rate"),
        "vico_step_s": round(t_vico, 4),
        "plain_step_s": round(t_plain, 4),
        "per_concept": results,
        "prompt": PROMPT,
        "samples_per_concept": args.samples,
        "train": {
            "steps": args.steps,
            "batch": args.batch,
            "block_lr": args.block_lr,
            "token_lr": 5e-3 * args.batch,
            "seed": args.seed,
        },  # fmt: skip
        "sampler": "ddim 50",
        "guidance_scale": GUIDANCE,
        "timing_batch": args.timing_batch,
        "grids": [str(args.out / f"{c}_grid.png") for c in args.concepts],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
