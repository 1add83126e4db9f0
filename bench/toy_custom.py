"""Custom Diffusion learns in the toy world: concept, text alignment, prior, joint, compose,
compress — trained with the project's recipes on the shipped toy base, scored by the toy judge.

Stages (each a real ``main.train`` run of a recipe, or a ``custom`` API call on its delta):

1. the base model: how often the plain class word gives the concept unasked;
2. ``finetune_real`` on concept A (``<new1>``, toy-world class images with their own captions
   as regularization): ``concept_rate``, ``text_align_rate``, ``prior_concept_rate_reg``;
3. ``finetune_noreg`` on concept A: ``prior_concept_rate_noreg`` (the seed-000 trade-off);
4. ``finetune_real`` on concept B, then ``custom.compose`` of the A and B deltas (tokens
   renamed ``<new1>``/``<new2>``, the two runs' regularization captions) -> ``compose_min_rate``;
5. ``finetune_joint`` on A and B -> ``joint_min_rate``;
6. ``custom.compress`` of the A delta at several ranks and the reference rule -> the size /
   fidelity curve (printed above the JSON); fidelity = concept_rate(compressed) /
   concept_rate(full) on the same prompts and seeds.

Every rate is over prompts x seeds sampled with fixed seeds (``toyworld.metrics``: DDIM 50,
guidance 5.0). ``*_min_rate`` is the smaller of the two concepts' rates on their own prompts.
The last stdout line is one JSON object.

    python bench/toy_custom.py [--seeds 16] [--steps 400] [--lr 1e-4] [--out logs/toy_custom]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from custom.compose import compose  # noqa: E402
from custom.compress import compress, nbytes  # noqa: E402
from custom.delta import apply_delta  # noqa: E402
from custom.formats import Delta  # noqa: E402
from ldm import load_model  # noqa: E402
from toyworld import metrics  # noqa: E402
from toyworld.captions import with_article  # noqa: E402
from toyworld.concepts import CONCEPTS  # noqa: E402
from toyworld.judge import Judge  # noqa: E402

log = logging.getLogger("toy_custom")


def compose_config(name: str, overrides: list[str], output_dir: Path):
    """A root config as ``python main.py --config-name NAME overrides`` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = hydra_compose(name, overrides=overrides, return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(output_dir)
    cfg.hydra.runtime.cwd = str(ROOT)
    HydraConfig.instance().set_config(cfg)
    return cfg


def concept_overrides(name: str, index: int = 0, suffix: str = "") -> list[str]:
    """Point a recipe's ``index``-th concept (and its prepare steps) at toy concept ``name``."""
    c = CONCEPTS[name]
    token = f"<new{index + 1}>"
    return [
        f"prepare.concept{suffix}.name={name}",
        f'data.train.concepts.{index}.instance_prompt="a photo of a {token} {c.class_word}"',
    ]


def train_recipe(recipe: str, overrides: list[str], out: Path) -> Path:
    """Run ``main.train`` on a recipe; returns its last delta (reused when it exists)."""
    from main import train

    delta = out / "checkpoints" / "last.safetensors"
    if delta.exists():
        log.info("%s: reusing %s", recipe, delta)
        return delta
    common = ["callbacks.log_samples=null", "callbacks.toy_eval=null", "logger=null"]
    cfg = compose_config(recipe, [*common, *overrides], out)
    start = time.perf_counter()
    train(cfg)
    log.info("%s trained in %.0f s -> %s", recipe, time.perf_counter() - start, delta)
    return delta


def with_delta(delta: Delta | Path):
    """A fresh toy base with ``delta`` applied."""
    model = load_model(None, "toy")
    src = delta if isinstance(delta, Path) else (delta.tensors, delta.meta)
    apply_delta(model, src)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", default="twotone_square,outlined_triangle",
                        help="concept A (single-concept stages) and B (joint / compose)")  # fmt: skip
    parser.add_argument("--reg-recipe", default="finetune_real", choices=["finetune_real", "finetune_gen"],
                        help="regularization: toy class images with their captions, or generated")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=16, help="images per prompt")
    parser.add_argument("--steps", type=int, default=None, help="default: the recipes' own")
    parser.add_argument("--joint-steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="base lr (x batch by scale_lr)")
    parser.add_argument("--ranks", default="1,2,4,8", help="fixed ranks of the compress curve")
    parser.add_argument("--stages", default="base,reg,noreg,compose,joint,compress")
    parser.add_argument("--quick", action="store_true", help="tuning: concept + class prompts only")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "logs" / "toy_custom"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    stages = set(args.stages.split(","))
    a, b = args.concepts.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_opts = list(args.extra)
    if args.steps:
        run_opts.append(f"trainer.max_steps={args.steps}")
    if args.lr:
        run_opts.append(f"model.learning_rate={args.lr}")
    joint_opts = [o for o in run_opts if not o.startswith("trainer.max_steps")]
    if args.joint_steps:
        joint_opts.append(f"trainer.max_steps={args.joint_steps}")

    t0 = time.perf_counter()
    judge = Judge.load()
    base = load_model(None, "toy")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    result: dict = {"concepts": [a, b], "seeds_per_prompt": args.seeds, "overrides": run_opts}
    grids = {}

    def evaluate(model, concept, token, families, tag):
        report = metrics.evaluate_concept(model, judge, concept, token, args.seeds, families)
        grids[tag] = report.grid()
        grids[tag].save(out / f"grid_{tag}.png")
        return report.rates

    def reg_overrides(name: str) -> list[str]:
        word = CONCEPTS[name].class_word
        if args.reg_recipe == "finetune_gen":
            return [f'prepare.class_images.prompt="a photo of {with_article(word)}"']
        return [f"prepare.class_images.class_word={word}"]

    if "base" in stages:
        r = evaluate(base, a, None, ("class", "align"), "base")
        result["base_concept_rate"] = r["class_concept_rate"]
        result["base_text_align_rate"] = r["text_align_rate"]

    delta_a = None
    if stages & {"reg", "compose", "compress"}:
        delta_a = train_recipe(args.reg_recipe, concept_overrides(a) + reg_overrides(a) + run_opts,
                               out / "reg_a")  # fmt: skip
    if "reg" in stages:
        fams = ("concept", "class") if args.quick else ("concept", "class", "align")
        r = evaluate(with_delta(delta_a), a, "<new1>", fams, "reg")
        result["concept_rate"] = r["concept_rate"]
        result["text_align_rate"] = r.get("text_align_rate")
        result["text_align_concept_rate"] = r.get("text_align_concept_rate")
        result["prior_concept_rate_reg"] = r["class_concept_rate"]

    if "noreg" in stages:
        delta = train_recipe("finetune_noreg", concept_overrides(a) + run_opts, out / "noreg_a")
        r = evaluate(with_delta(delta), a, "<new1>", ("concept", "class"), "noreg")
        result["prior_concept_rate_noreg"] = r["class_concept_rate"]
        result["concept_rate_noreg"] = r["concept_rate"]

    if "compose" in stages:
        delta_b = train_recipe(args.reg_recipe, concept_overrides(b) + reg_overrides(b) + run_opts,
                               out / "reg_b")  # fmt: skip
        da, db = Delta.load(delta_a), Delta.load(delta_b)
        da.tokens, db.tokens = ["<new1>"], ["<new2>"]
        captions = []
        for run in ("reg_a", "reg_b"):
            captions += (out / run / "class_images" / "caption.txt").read_text().splitlines()[:100]
        cats = [CONCEPTS[a].class_word, CONCEPTS[b].class_word]
        merged, rep = compose([da, db], base, cats, captions)
        result["compose_max_constraint_residual"] = max(rep["max_constraint_residual"].values())
        model = with_delta(merged)
        ra = evaluate(model, a, "<new1>", ("concept",), "compose_a")["concept_rate"]
        rb = evaluate(model, b, "<new2>", ("concept",), "compose_b")["concept_rate"]
        model_b = with_delta(delta_b)
        result["single_b_concept_rate"] = evaluate(model_b, b, "<new1>", ("concept",), "reg_b")[
            "concept_rate"
        ]
        result["compose_rates"] = [ra, rb]
        result["compose_min_rate"] = min(ra, rb)

    if "joint" in stages:
        ov = ["prepare.concept.name=" + a, "prepare.concept2.name=" + b,
              f"prepare.class_images.class_word={CONCEPTS[a].class_word}",
              f"prepare.class_images2.class_word={CONCEPTS[b].class_word}",
              f'data.train.concepts.0.instance_prompt="a photo of a <new1> {CONCEPTS[a].class_word}"',
              f'data.train.concepts.1.instance_prompt="a photo of a <new2> {CONCEPTS[b].class_word}"',
              *joint_opts]  # fmt: skip
        delta = train_recipe("finetune_joint", ov, out / "joint")
        model = with_delta(delta)
        ra = evaluate(model, a, "<new1>", ("concept",), "joint_a")["concept_rate"]
        rb = evaluate(model, b, "<new2>", ("concept",), "joint_b")["concept_rate"]
        result["joint_rates"] = [ra, rb]
        result["joint_min_rate"] = min(ra, rb)

    if "compress" in stages:
        full = Delta.load(delta_a)
        full_rate = result.get("concept_rate")
        if full_rate is None:
            full_rate = evaluate(with_delta(full), a, "<new1>", ("concept",), "reg")[
                "concept_rate"
            ]
        curve = []
        settings = [("rank", int(r)) for r in args.ranks.split(",")] + [("ratio", 0.6)]
        for kind, value in settings:
            kw = {"rank": value} if kind == "rank" else {"ratio": value}
            tensors, meta = compress(full.tensors, full.meta, base_state, **kw)
            size = nbytes(tensors) / nbytes(full.tensors)
            model = with_delta(Delta(tensors, full.tokens, meta))
            rate = evaluate(model, a, "<new1>", ("concept",), f"compress_{kind}{value}")[
                "concept_rate"
            ]
            ranks = json.loads(meta["ranks"]).values()
            curve.append({"setting": f"{kind}={value}", "ranks": [min(ranks), max(ranks)],
                          "size_ratio": round(size, 4), "concept_rate": rate,
                          "fidelity": round(rate / max(full_rate, 1e-9), 4)})  # fmt: skip
        print("compress curve (size = compressed / full delta bytes; fidelity = concept_rate "
              f"compressed / full {full_rate}):")  # fmt: skip
        for p in curve:
            print(f"  {p['setting']:>10}  ranks {p['ranks'][0]}-{p['ranks'][1]}  "
                  f"size {p['size_ratio']:.3f}  concept_rate {p['concept_rate']:.3f}  "
                  f"fidelity {p['fidelity']:.3f}")  # fmt: skip
        result["compress_curve"] = curve
        ok = [p for p in curve if p["fidelity"] >= 0.95]
        head = min(ok, key=lambda p: p["size_ratio"]) if ok else max(curve, key=lambda p: p["fidelity"])
        result["compress_setting"] = head["setting"]
        result["compress_size_ratio"] = head["size_ratio"]
        result["compress_fidelity_ratio"] = head["fidelity"]

    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
