"""Custom Diffusion learns in the toy world: concept, text alignment, prior, joint training,
compose and compress -- trained with the project's recipes on the shipped toy base, scored by
the toy judge (``toyworld.metrics``: fixed seeds, DDIM 50, guidance 5.0).

Stages (each a real ``main.train`` run of a recipe, or the ``python -m custom`` CLI on a delta):

1. ``base``: the untouched base on concept A's class-word prompts -> ``base_concept_rate``;
2. ``reg``: ``finetune_toy`` on A (``<new1>``; regularization = 200 images the base generates
   for "a photo of a triangle" + 200 held-out toy-world scenes with triangles and their own
   captions) -> ``concept_rate``, ``text_align_rate``, ``prior_concept_rate_reg``;
3. ``real`` / ``noreg``: ``finetune_real`` (the captioned scenes only) and ``finetune_noreg`` on
   A with the same schedule -> ``prior_concept_rate_real``, ``prior_concept_rate_noreg``;
4. ``compose``: ``finetune_toy`` on concept B, then ``python -m custom compose`` of the A and B
   deltas (tokens renamed ``<new1>``/``<new2>``, 200 generic toy-world captions as the
   regularization captions) -> ``compose_min_rate``;
5. ``joint``: ``finetune_joint`` on A and B -> ``joint_min_rate``;
6. ``compress``: ``python -m custom compress`` of the A delta at fixed ranks and by the
   reference rule (ratio 0.6) -> the size / fidelity curve, printed above the JSON. Size = the
   compressed delta's tensor bytes / the full delta's; fidelity = concept_rate(compressed) /
   concept_rate(full) on the same prompts and seeds (``--compress-seeds`` per prompt). The
   headline point is the smallest one with fidelity >= 0.95 (else the most faithful one).

``*_min_rate`` is the smaller of the two concepts' rates on their own prompts. Runs are reused
when their folder under ``--out`` already holds a delta. The last stdout line is one JSON object.

    python bench/toy_custom.py [--seeds 16] [--steps 1600] [--lr 1e-4] [--out logs/toy_custom]
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

from custom.__main__ import main as custom_cli  # noqa: E402
from custom.compress import nbytes  # noqa: E402
from custom.delta import apply_delta  # noqa: E402
from custom.formats import Delta  # noqa: E402
from ldm import load_model  # noqa: E402
from toyworld import metrics  # noqa: E402
from toyworld.captions import with_article  # noqa: E402
from toyworld.concepts import CONCEPTS  # noqa: E402
from toyworld.dataset import make_example  # noqa: E402
from toyworld.judge import Judge  # noqa: E402

log = logging.getLogger("toy_custom")
STAGES = "base,reg,real,noreg,compose,joint,compress"


def compose_config(name: str, overrides: list[str], output_dir: Path):
    """A root config as ``python main.py --config-name NAME overrides`` composes it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(output_dir)
    cfg.hydra.runtime.cwd = str(ROOT)
    HydraConfig.instance().set_config(cfg)
    return cfg


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


def concept_overrides(recipe: str, name: str) -> list[str]:
    """Point a single-concept recipe (its data and ``prepare`` steps) at toy concept ``name``."""
    word = CONCEPTS[name].class_word
    out = [
        f"prepare.concept.name={name}",
        f'data.train.concepts.0.instance_prompt="a photo of a <new1> {word}"',
    ]
    if recipe in ("finetune_toy", "finetune_gen"):
        out.append(f'prepare.class_images.prompt="a photo of {with_article(word)}"')
    if recipe in ("finetune_toy", "finetune_real"):
        key = "real_images" if recipe == "finetune_toy" else "class_images"
        out.append(f"prepare.{key}.class_word={word}")
    return out


def joint_overrides(a: str, b: str) -> list[str]:
    out = []
    for i, (name, suffix) in enumerate(((a, ""), (b, "2"))):
        word = CONCEPTS[name].class_word
        out += [
            f"prepare.concept{suffix}.name={name}",
            f"prepare.class_images{suffix}.class_word={word}",
            f'data.train.concepts.{i}.instance_prompt="a photo of a <new{i + 1}> {word}"',
        ]
    return out


def with_delta(delta: Path) -> torch.nn.Module:
    """A fresh toy base with ``delta`` applied."""
    model = load_model(None, "toy")
    apply_delta(model, delta)
    return model.eval()


def cli(*argv: str) -> None:
    """``python -m custom ...`` in this process (on the toy base); raises if it fails."""
    if custom_cli([*argv, "--config", "toy", "--overwrite"]) != 0:
        raise RuntimeError(f"python -m custom {' '.join(argv)} failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", default="outlined_triangle,twotone_square",
                        help="concept A (single-concept stages), B (joint / compose)")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=16, help="images per prompt")
    parser.add_argument("--compress-seeds", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="default: finetune_toy's")
    parser.add_argument("--joint-steps", type=int, default=None, help="default: 2 x steps")
    parser.add_argument("--lr", type=float, default=None, help="default: finetune_toy's")
    parser.add_argument("--ranks", default="1,2,4,8,16", help="fixed ranks of the compress curve")
    parser.add_argument("--stages", default=STAGES)
    parser.add_argument("--quick", action="store_true", help="tuning: concept + class prompts only")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides for every run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "logs" / "toy_custom"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)  # more threads only contend on a shared CPU
    stages = set(args.stages.split(","))
    a, b = args.concepts.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # One schedule for every single-concept run: finetune_toy's unless given.
    toy = compose_config("finetune_toy", [], out)
    steps = args.steps or int(toy.trainer.max_steps)
    lr = args.lr or float(toy.model.learning_rate)
    schedule = [f"trainer.max_steps={steps}", f"model.learning_rate={lr}", *args.extra]
    joint_schedule = [f"trainer.max_steps={args.joint_steps or 2 * steps}",
                      f"model.learning_rate={lr}", *args.extra]  # fmt: skip

    t0 = time.perf_counter()
    judge = Judge.load()
    result: dict = {"concepts": [a, b], "steps": steps, "lr": lr, "seeds_per_prompt": args.seeds}

    def evaluate(model, concept, token, families, tag, seeds=args.seeds):
        report = metrics.evaluate_concept(model, judge, concept, token, seeds, families)
        report.grid().save(out / f"grid_{tag}.png")
        return report.rates

    def single(recipe: str, concept: str, tag: str) -> Path:
        return train_recipe(recipe, concept_overrides(recipe, concept) + schedule, out / tag)

    if "base" in stages:
        base = load_model(None, "toy")
        r = evaluate(base, a, None, ("class",), "base")
        result["base_concept_rate"] = r["class_concept_rate"]

    fams = ("concept", "class") if args.quick else ("concept", "class", "align")
    delta_a = single("finetune_toy", a, "reg_a") if stages & {"reg", "compose", "compress"} else None
    if "reg" in stages:
        r = evaluate(with_delta(delta_a), a, "<new1>", fams, "reg_a")
        result["concept_rate"] = r["concept_rate"]
        result["prior_concept_rate_reg"] = r["class_concept_rate"]
        result.update({k: v for k, v in r.items() if k.startswith("text_align")})

    for recipe, tag in (("finetune_real", "real"), ("finetune_noreg", "noreg")):
        if tag in stages:
            r = evaluate(with_delta(single(recipe, a, f"{tag}_a")), a, "<new1>", fams, tag)
            result[f"prior_concept_rate_{tag}"] = r["class_concept_rate"]
            result[f"concept_rate_{tag}"] = r["concept_rate"]
            if "text_align_rate" in r:
                result[f"text_align_rate_{tag}"] = r["text_align_rate"]

    if "compose" in stages:
        delta_b = single("finetune_toy", b, "reg_b")
        result["concept_rate_b"] = evaluate(with_delta(delta_b), b, "<new1>", ("concept",),
                                            "reg_b")["concept_rate"]  # fmt: skip
        captions = out / "compose_captions.txt"  # generic toy-world captions (held-out stream)
        captions.write_text("\n".join(make_example(i, seed=7).caption for i in range(200)) + "\n")
        merged = out / "compose" / "merged.safetensors"
        merged.parent.mkdir(exist_ok=True)
        words = f"{CONCEPTS[a].class_word}+{CONCEPTS[b].class_word}"
        cli("compose", str(delta_a), str(delta_b), "-o", str(merged), "--categories", words,
            "--reg-captions", str(captions), "--tokens", "<new1>", "<new2>")  # fmt: skip
        report = json.loads(merged.with_suffix(".json").read_text())
        result["compose_max_constraint_residual"] = max(report["max_constraint_residual"].values())
        model = with_delta(merged)
        ra = evaluate(model, a, "<new1>", ("concept",), "compose_a")["concept_rate"]
        rb = evaluate(model, b, "<new2>", ("concept",), "compose_b")["concept_rate"]
        result["compose_rates"] = [ra, rb]
        result["compose_min_rate"] = min(ra, rb)

    if "joint" in stages:
        delta = train_recipe("finetune_joint", joint_overrides(a, b) + joint_schedule,
                             out / "joint")  # fmt: skip
        model = with_delta(delta)
        ra = evaluate(model, a, "<new1>", ("concept",), "joint_a")["concept_rate"]
        rb = evaluate(model, b, "<new2>", ("concept",), "joint_b")["concept_rate"]
        result["joint_rates"] = [ra, rb]
        result["joint_min_rate"] = min(ra, rb)

    if "compress" in stages:
        n = args.compress_seeds
        full_rate = evaluate(with_delta(delta_a), a, "<new1>", ("concept",), "compress_full",
                             n)["concept_rate"]  # fmt: skip
        full_bytes = nbytes(Delta.load(delta_a).tensors)
        curve = []
        settings = [("rank", r) for r in args.ranks.split(",")] + [("ratio", "0.6")]
        for kind, value in settings:
            path = out / "compress" / f"{kind}{value}.safetensors"
            path.parent.mkdir(exist_ok=True)
            cli("compress", str(delta_a), "-o", str(path), f"--{kind}", value)
            compressed = Delta.load(path)
            ranks = json.loads(compressed.meta["ranks"]).values()
            rate = evaluate(with_delta(path), a, "<new1>", ("concept",), f"compress_{kind}{value}",
                            n)["concept_rate"]  # fmt: skip
            curve.append({
                "setting": f"{kind}={value}", "ranks": [min(ranks), max(ranks)],
                "size_ratio": round(nbytes(compressed.tensors) / full_bytes, 4),
                "concept_rate": rate, "fidelity": round(rate / max(full_rate, 1e-9), 4),
            })  # fmt: skip
        print(f"compress curve of {delta_a} (size = compressed / full delta tensor bytes, "
              f"fidelity = concept_rate compressed / full {full_rate}, {2 * n} images each):")  # fmt: skip
        for p in curve:
            print(f"  {p['setting']:>10}  ranks {p['ranks'][0]:>2}-{p['ranks'][1]:<2}  "
                  f"size {p['size_ratio']:.3f}  concept_rate {p['concept_rate']:.3f}  "
                  f"fidelity {p['fidelity']:.3f}")  # fmt: skip
        ok = [p for p in curve if p["fidelity"] >= 0.95]
        head = (min(ok, key=lambda p: p["size_ratio"]) if ok
                else max(curve, key=lambda p: p["fidelity"]))  # fmt: skip
        result["compress_full_concept_rate"] = full_rate
        result["compress_curve"] = curve
        result["compress_setting"] = head["setting"]
        result["compress_size_ratio"] = head["size_ratio"]
        result["compress_fidelity_ratio"] = head["fidelity"]

    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
