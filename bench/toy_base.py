"""How well the shipped toy-world base draws what it is asked, scored by the toy judge.

Single-object prompts ("a photo of a red circle") x seeds, and two-object prompts ("a red circle
and a blue square") x seeds, DDIM 50 at the shipped guidance scale. Also the judge's own accuracy
on fresh generator images and on their VAE reconstructions. Last stdout line: JSON with
``color_acc``, ``shape_acc``, ``object_acc``, ``both_objects_rate``, ``judge_acc_clean``,
``judge_acc_recon``.

    python bench/toy_base.py [--config toy64] [--ckpt PATH] [--seeds 8] [--grid PNG]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from ldm import load_model  # noqa: E402
from ldm.generate import generate  # noqa: E402
from ldm.image_io import from_pil, make_grid, to_pil  # noqa: E402
from toyworld import COLOURS, SHAPES  # noqa: E402
from toyworld.captions import caption  # noqa: E402
from toyworld.dataset import make_example  # noqa: E402
from toyworld.judge import Judge, evaluate_judge  # noqa: E402
from toyworld.world import ObjectSpec  # noqa: E402

GUIDANCE = 5.0  # the toy base's shipped guidance scale (model card)


def single_prompts(n: int) -> list[tuple[str, str]]:
    """``n`` (colour, shape) pairs covering every colour and every shape."""
    pairs = [(COLOURS[i % len(COLOURS)], SHAPES[(i + i // len(COLOURS)) % len(SHAPES)])
             for i in range(max(n, len(COLOURS) * 2))]  # fmt: skip
    return pairs[:n]


def pair_prompts(n: int) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """``n`` two-object prompts with different colours and different shapes."""
    out = []
    for (c1, c2), (s1, s2) in zip(
        itertools.permutations(COLOURS, 2), itertools.cycle(itertools.permutations(SHAPES, 2))
    ):
        out.append(((c1, s1), (c2, s2)))
        if len(out) == n:
            break
    return out


def sample_all(model, prompts: list[str], seeds: int) -> torch.Tensor:
    """``seeds`` images per prompt; image i of a prompt uses seed 1000 + i (batch-independent)."""
    return torch.cat(
        [generate(model, [p] * seeds, steps=50, guidance_scale=GUIDANCE, seed=1000,
                  progress=False) for p in prompts]
    )  # fmt: skip


def judge_accuracy(model, judge: Judge, n: int) -> tuple[dict, dict]:
    examples = [make_example(i, seed=987_654, size=model.pixel_size()) for i in range(n)]
    examples = [e for e in examples if len(e.objects) <= 2]
    x = from_pil([e.image for e in examples])
    objects = [e.objects for e in examples]
    with torch.no_grad():
        z = model.get_first_stage_encoding(model.encode_first_stage(x)) / model.scale_factor
        recon = ((model.first_stage_model.decode(z) + 1) / 2).clamp(0, 1)
    return evaluate_judge(judge, x, objects), evaluate_judge(judge, recon * 2 - 1, objects)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=None, help="default: the model config's shipped weights")
    parser.add_argument(
        "--config", default="toy", help="model config: toy (32 px), toy64, toy64_local"
    )
    parser.add_argument("--single", type=int, default=12)
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--judge-n", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grid", default=str(ROOT / "logs" / "toy_base_grid.png"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(args.ckpt, config=args.config)
    judge = Judge.load()

    singles = single_prompts(args.single)
    prompts = [caption([ObjectSpec(shape=s, colour=c)], "a photo of {}") for c, s in singles]
    imgs = sample_all(model, prompts, args.seeds)
    found = judge.objects(imgs * 2 - 1)
    truth = [pair for pair in singles for _ in range(args.seeds)]
    color = sum(any(c == tc for c, _ in f) for f, (tc, _) in zip(found, truth, strict=True))
    shape = sum(any(s == ts for _, s in f) for f, (_, ts) in zip(found, truth, strict=True))
    exact = sum(t in f for f, t in zip(found, truth, strict=True))

    pairs = pair_prompts(args.pairs)
    pair_text = [caption([ObjectSpec(shape=a[1], colour=a[0]), ObjectSpec(shape=b[1], colour=b[0])],
                         "{}") for a, b in pairs]  # fmt: skip
    pimgs = sample_all(model, pair_text, args.seeds)
    pfound = judge.objects(pimgs * 2 - 1)
    ptruth = [p for p in pairs for _ in range(args.seeds)]
    both = sum(a in f and b in f for f, (a, b) in zip(pfound, ptruth, strict=True))
    one = sum((a in f) != (b in f) for f, (a, b) in zip(pfound, ptruth, strict=True))

    grid_path = Path(args.grid)
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    rows = [imgs[i * args.seeds : i * args.seeds + 8] for i in range(min(6, args.single))]
    rows += [pimgs[i * args.seeds : i * args.seeds + 8] for i in range(min(6, args.pairs))]
    make_grid(to_pil(torch.cat(rows)), ncols=min(8, args.seeds)).save(grid_path)

    clean, recon = judge_accuracy(model, judge, args.judge_n)
    n = len(truth)
    out = {
        "color_acc": round(color / n, 4),
        "shape_acc": round(shape / n, 4),
        "object_acc": round(exact / n, 4),
        "both_objects_rate": round(both / len(ptruth), 4),
        "one_object_only_rate": round(one / len(ptruth), 4),
        "judge_acc_clean": clean["exact_set_accuracy"],
        "judge_acc_recon": recon["exact_set_accuracy"],
        "n_single": n,
        "n_pairs": len(ptruth),
        "guidance_scale": GUIDANCE,
        "config": args.config,
        "grid": str(grid_path),
        "single_prompts": prompts,
        "pair_prompts": pair_text,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
