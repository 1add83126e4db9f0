"""Custom Diffusion learns in the toy world: concept, text alignment, prior, joint training,
compose and compress -- trained with the project's recipes on the shipped toy base, scored by
the toy judge (``toyworld.metrics``: fixed seeds, DDIM 50, guidance 5.0).

Stages (each a real ``main.train`` run of a recipe, or the ``python -m custom`` CLI on a delta):

1. ``base``: the untouched base on concept A's class-word prompts -> ``base_concept_rate``;
2. ``reg``: ``finetune_toy`` on A (``<new1>``; regularization = 200 images the base generates
   for "a photo of a triangle" + 200 held-out toy-world scenes with triangles and their own
   captions), once per ``--train-seeds`` seed -> ``concept_rate``, ``text_align_rate``,
   ``prior_concept_rate_reg`` (the mean over the seeds; ``*_per_seed`` beside them);
3. ``real`` / ``noreg``: ``finetune_real`` (the captioned scenes only) and ``finetune_noreg`` on
   A with the same schedule (steps, rates and ``finetune_toy``'s lr decay) ->
   ``prior_concept_rate_real``, ``prior_concept_rate_noreg``;
4. ``compose``: per ``--train-seeds`` seed, ``finetune_toy`` on A and on concept B alone with
   the two-concept schedule (below), then ``python -m custom compose`` of these two deltas
   (tokens renamed ``<new1>``/``<new2>``, 200 generic toy-world captions as the regularization
   captions) three ways: the headline with the target prompt "a photo of a <new1> triangle"
   and its first ``--compose-padding`` (8) positions after the end token constrained too
   (``--target-padding``) -> ``compose_rates``, ``compose_min_rate`` (means over the seeds);
   with both prompts the concepts are sampled with ("a photo of a <new1> triangle", "a <new1>
   triangle") and no padding -> ``compose_both_prompts_*``; with the reference's target
   prompts and no padding -> ``compose_reference_prompts_*``. ``*_generic_object_rate`` (and
   ``generic_object_rate_base``): how often the merged model (the base) still draws plain
   single-object prompts ("a photo of a red circle", one per shape) right;
5. ``joint``: ``finetune_joint_toy`` (``finetune_joint`` with ``finetune_toy``'s pooled
   regularization for each concept) on A and B with the two-concept schedule, once per
   ``--train-seeds`` -> ``joint_rates`` (means), ``joint_min_rate`` (the smaller mean);
6. ``compress``: ``python -m custom compress`` of the A delta at fixed ranks and by the
   reference rule (ratio 0.6) -> the size / fidelity curve, printed above the JSON. Size = the
   compressed delta's tensor bytes / the full delta's; fidelity = concept_rate(compressed) /
   concept_rate(full) on the same prompts and seeds (``--compress-seeds`` per prompt); image
   fidelity = 1 - mean |x - x_full| / mean |x_rank0 - x_full| over those images, where rank 0
   keeps the base K/V and only the trained token row (the share of what the K/V training
   changed in the images that the compressed delta keeps). The headline (``compress_*``) is
   the reference rule, fixed in advance.

``*_min_rate`` is the smaller of the two concepts' rates on their own prompts. The two-concept
stages use their own schedule: ``--pair-steps`` 1600 at a constant lr, the K/V at a tenth of
the single-concept rate and the token rows at ten times the K/V one (``--pair-lr`` 2e-5,
``--pair-token-lr`` 2e-4: a merge keeps generic captions' K/V outputs at the base's, so deltas
that carry the concept in the token row rather than in K/V survive it better; README), and no
rescale augmentation (``data.train.aug=false``; ``--pair-aug`` keeps it). B is the two-tone
``twotone_square``: besides A, the judge sees only the two-tone concepts through the toy
autoencoder (it finds the dotted concepts in 0% and ``striped_circle`` in 9% of perfect VAE
reconstructions of their own images), and ``twotone_ring`` learns worse (0.25 where B has 0.66).
The augmentation pastes a quarter of the target images at 10-18 px on the 32 px canvas, where a
two-tone object's halves are one or two latent cells wide, and prefixes rescaled images'
captions with "a far away", "very small", "zoomed in" or "close up", words no toy caption
contains (the likely causes); with it B comes out deformed and its orange half drifts to yellow
at guidance 5, which the judge reads as the "blue and yellow square" near miss (single B
0.0-0.19 at 800 steps, yellower with more). Without it B reaches 0.66 at 800 steps and 0.91 at
1600 (A 1.0 and 0.97) -- but the tokens stop obeying colour words (A's text alignment 0.33-0.38,
colours 0.0), so the single-concept stages (``concept_rate``, ``text_align_rate``, compress)
keep it. With the pooled regularization (``finetune_joint_toy``) B also survives joint training
with A, and with the padding rows (``--compose-padding``) the merge (README). B is also
scored at guidance ``--diag-guidance`` (3), a diagnostic only.
Runs are reused when their folder under ``--out`` already holds a delta. The last stdout line
is one JSON object.

    python bench/toy_custom.py [--seeds 16] [--train-seeds 0,1,2] [--steps 2400] [--lr 2e-4]
        [--token-lr 1e-4] [--pair-steps 1600] [--pair-lr 2e-5] [--pair-token-lr 2e-4]
        [--out logs/toy_custom]
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
from omegaconf import OmegaConf  # noqa: E402

from custom.__main__ import main as custom_cli  # noqa: E402
from custom.compress import nbytes  # noqa: E402
from custom.delta import apply_delta  # noqa: E402
from custom.formats import ROWS, Delta  # noqa: E402
from ldm import load_model  # noqa: E402
from main import compose_config, train  # noqa: E402
from toyworld import metrics  # noqa: E402
from toyworld.concepts import CONCEPTS  # noqa: E402
from toyworld.dataset import make_example  # noqa: E402
from toyworld.judge import Judge  # noqa: E402
from toyworld.world import COLOURS, SHAPES  # noqa: E402

log = logging.getLogger("toy_custom")
STAGES = "base,reg,real,noreg,compose,joint,compress"


def lr_scheduler_override(cfg) -> str:
    """``model.lr_scheduler=...`` carrying ``cfg``'s schedule (interpolations kept) to the
    recipes that train on finetune_toy's schedule (finetune_real, finetune_noreg)."""
    sched = cfg.model.get("lr_scheduler")
    if sched is None:
        return "model.lr_scheduler=null"
    items = OmegaConf.to_container(sched, resolve=False).items()
    value = ",".join(f"{k}:{str(v).lower() if isinstance(v, bool) else v}" for k, v in items)
    return f"model.lr_scheduler={{{value}}}"


def train_recipe(recipe: str, overrides: list[str], out: Path) -> Path:
    """Run ``main.train`` on a recipe; returns its last delta (reused when it exists)."""
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


def seed_suffix(seed: int) -> str:
    """How a run's folder and grids name its training seed: nothing for seed 0."""
    return "" if seed == 0 else f"_seed{seed}"


def mean(values: list[float]) -> float:
    """The mean over training seeds, as the JSON reports it."""
    return round(sum(values) / len(values), 4)


def no_flip(*names: str) -> list[str]:
    """A two-tone concept is left/right: a flipped image would teach a different object."""
    return ["data.train.flip_p=0"] if any(CONCEPTS[n].pattern == "twotone" for n in names) else []


def concept_overrides(recipe: str, name: str) -> list[str]:
    """Point a single-concept recipe (its data and ``prepare`` steps) at toy concept ``name``."""
    word = CONCEPTS[name].class_word
    if recipe == "finetune_toy":
        return [f"concept={name}", f"class_word={word}", *no_flip(name)]
    out = [
        f"prepare.concept.name={name}",
        f'data.train.concepts.0.instance_prompt="a photo of a <new1> {word}"',
        *no_flip(name),
    ]
    if recipe == "finetune_real":
        out.append(f"prepare.class_images.class_word={word}")
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
    return out + no_flip(a, b)


# Plain objects, each shape once in a different colour: does a merged model still draw the world?
GENERIC_OBJECTS = list(zip(COLOURS, SHAPES, strict=False))


def generic_object_rate(model, judge: Judge, seeds: int) -> float:
    """Share of images of "a photo of a <colour> <shape>" holding exactly that object."""
    prompts = [f"a photo of a {c} {s}" for c, s in GENERIC_OBJECTS]
    samples = metrics.sample_and_judge(model, judge, prompts, seeds)
    return round(metrics.object_rate(samples, GENERIC_OBJECTS), 4)


def with_delta(delta: Path | tuple) -> torch.nn.Module:
    """A fresh toy base with ``delta`` (a file, or ``(tensors, metadata)``) applied."""
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
    parser.add_argument("--pair-steps", "--joint-steps", type=int, default=1600,
                        help="two-concept stages' steps")  # fmt: skip
    parser.add_argument("--pair-lr", type=float, default=2e-5,
                        help="two-concept stages' K/V base lr")  # fmt: skip
    parser.add_argument("--pair-token-lr", type=float, default=2e-4,
                        help="two-concept stages' token base lr")  # fmt: skip
    parser.add_argument("--pair-aug", action="store_true",
                        help="keep the rescale augmentation in the two-concept stages")  # fmt: skip
    parser.add_argument("--compose-padding", type=int, default=8,
                        help="the headline merge's --target-padding")  # fmt: skip
    parser.add_argument("--joint-recipe", default="finetune_joint_toy",
                        help="joint stage recipe (finetune_joint: scenes only)")  # fmt: skip
    parser.add_argument("--lr", type=float, default=None, help="default: finetune_toy's")
    parser.add_argument("--token-lr", type=float, default=None,
                        help="token rows' base lr (default: finetune_toy's)")  # fmt: skip
    parser.add_argument("--train-seeds", default="0,1,2",
                        help="reg stage's training seeds; its rates are their mean")  # fmt: skip
    parser.add_argument("--ranks", default="1,2,4,8,16", help="fixed ranks of the compress curve")
    parser.add_argument("--stages", default=STAGES)
    parser.add_argument("--diag-guidance", type=float, default=3.0,
                        help="also score concept B at this guidance (0: off)")  # fmt: skip
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
    token_lr = args.token_lr or toy.model.token_learning_rate
    rates = [f"model.learning_rate={lr}"]
    if token_lr is not None:  # null in the recipe: the K/V rate, as the reference trains
        rates.append(f"model.token_learning_rate={token_lr}")
    schedule = [f"trainer.max_steps={steps}", *rates, lr_scheduler_override(toy), *args.extra]
    # The two-concept stages (joint, and the single deltas compose merges): their own steps and
    # rates, and no rescale augmentation (see the docstring).
    pair_steps = args.pair_steps
    pair_rates = [f"model.learning_rate={args.pair_lr}",
                  f"model.token_learning_rate={args.pair_token_lr}"]  # fmt: skip
    pair_schedule = [f"trainer.max_steps={pair_steps}", *pair_rates, "model.lr_scheduler=null",
                     f"data.train.aug={str(args.pair_aug).lower()}", *args.extra]  # fmt: skip

    t0 = time.perf_counter()
    judge = Judge.load()
    train_seeds = [int(s) for s in args.train_seeds.split(",")]
    result: dict = {"concepts": [a, b], "steps": steps, "lr": lr, "token_lr": token_lr,
                    "pair_steps": pair_steps, "pair_lr": args.pair_lr,
                    "pair_token_lr": args.pair_token_lr, "pair_aug": args.pair_aug,
                    "seeds_per_prompt": args.seeds, "train_seeds": train_seeds}  # fmt: skip

    def evaluate(model, concept, token, families, tag, seeds=args.seeds, **kw):
        report = metrics.evaluate_concept(model, judge, concept, token, seeds, families, **kw)
        report.grid().save(out / f"grid_{tag}.png")
        return report.rates

    def rate(model, concept, token, tag) -> float:
        return evaluate(model, concept, token, ("concept",), tag)["concept_rate"]

    diag: dict[str, float] = {}

    def diagnose(model, token: str, tag: str) -> None:
        """Concept B's rate at a lower guidance (not a headline number: see the README)."""
        if args.diag_guidance:
            diag[tag] = evaluate(model, b, token, ("concept",), f"{tag}_diag",
                                 guidance_scale=args.diag_guidance)["concept_rate"]  # fmt: skip

    def single(recipe: str, concept: str, tag: str, sched: list[str] = schedule) -> Path:
        return train_recipe(recipe, concept_overrides(recipe, concept) + sched, out / tag)

    def reg_run(seed: int) -> tuple[Path, str]:
        """``finetune_toy`` on A with training seed ``seed``; seed 0's delta is also compressed."""
        tag = f"reg_a{seed_suffix(seed)}"
        return single("finetune_toy", a, tag, [*schedule, f"seed={seed}"]), tag

    if "base" in stages:
        base = load_model(None, "toy")
        r = evaluate(base, a, None, ("class",), "base")
        result["base_concept_rate"] = r["class_concept_rate"]

    fams = ("concept", "class") if args.quick else ("concept", "class", "align")
    if "reg" in stages:
        # Training seeds differ by more than the 32 sampled images resolve (0.84-0.94 concept
        # rate): the headline is the mean over --train-seeds, each seed's rates beside it.
        runs = []
        for seed in train_seeds:
            delta, tag = reg_run(seed)
            runs.append(evaluate(with_delta(delta), a, "<new1>", fams, tag))
        keys = ["concept_rate", "class_concept_rate",
                *(k for k in runs[0] if k.startswith("text_align"))]  # fmt: skip
        for key in keys:
            name = "prior_concept_rate_reg" if key == "class_concept_rate" else key
            values = [r[key] for r in runs]
            result[name] = mean(values)
            result[f"{name}_per_seed"] = values

    for recipe, tag in (("finetune_real", "real"), ("finetune_noreg", "noreg")):
        if tag in stages:
            r = evaluate(with_delta(single(recipe, a, f"{tag}_a")), a, "<new1>", fams, tag)
            result[f"prior_concept_rate_{tag}"] = r["class_concept_rate"]
            result[f"concept_rate_{tag}"] = r["concept_rate"]
            if "text_align_rate" in r:
                result[f"text_align_rate_{tag}"] = r["text_align_rate"]

    if "compose" in stages:
        # Per training seed: A and B alone with the two-concept schedule, then merged three ways.
        captions = out / "compose_captions.txt"  # generic toy-world captions (held-out stream)
        captions.write_text("\n".join(make_example(i, seed=7).caption for i in range(200)) + "\n")
        words = f"{CONCEPTS[a].class_word}+{CONCEPTS[b].class_word}"
        result["generic_object_rate_base"] = generic_object_rate(load_model(None, "toy"), judge,
                                                                 args.seeds)  # fmt: skip
        # The prompts the concepts are sampled with: "a photo of a {}", "a {}".
        sampling = [t.format("a {}") for t in metrics.CONCEPT_TEMPLATES]
        settings = {  # name: (target prompts, target padding)
            "": (sampling[:1], args.compose_padding),
            "_both_prompts": (sampling, 0),
            "_reference_prompts": ([], 0),
        }
        runs: dict[str, list[dict]] = {name: [] for name in settings}
        alone = []
        for seed in train_seeds:
            sfx = seed_suffix(seed)
            sched = [*pair_schedule, f"seed={seed}"]
            pair_a = single("finetune_toy", a, f"pair_a{sfx}", sched)
            pair_b = single("finetune_toy", b, f"pair_b{sfx}", sched)
            model_b = with_delta(pair_b)
            alone.append([
                rate(with_delta(pair_a), a, "<new1>", f"pair_a{sfx}"),
                rate(model_b, b, "<new1>", f"pair_b{sfx}"),
            ])  # fmt: skip
            if seed == train_seeds[0]:
                diagnose(model_b, "<new1>", "single_b")
            for name, (templates, padding) in settings.items():
                merged = out / "compose" / f"merged{name}{sfx}.safetensors"
                merged.parent.mkdir(exist_ok=True)
                cli("compose", str(pair_a), str(pair_b), "-o", str(merged), "--categories", words,
                    "--reg-captions", str(captions), "--tokens", "<new1>", "<new2>",
                    "--target-padding", str(padding), "--overwrite",
                    *(["--templates", *templates] if templates else []))  # fmt: skip
                report = json.loads(merged.with_suffix(".json").read_text())
                model = with_delta(merged)
                runs[name].append({
                    "rates": [
                        rate(model, a, "<new1>", f"compose{name}{sfx}_a"),
                        rate(model, b, "<new2>", f"compose{name}{sfx}_b"),
                    ],
                    "generic": generic_object_rate(model, judge, args.seeds),
                    "residual": max(report["max_constraint_residual"].values()),
                    "reg_change": report["max_reg_rel_change"],
                })  # fmt: skip
                if not name and seed == train_seeds[0]:
                    diagnose(model, "<new2>", "compose_b")
        result["concept_rate_a_pair"] = mean([r[0] for r in alone])
        result["concept_rate_b"] = mean([r[1] for r in alone])
        result["concept_rates_pair_per_seed"] = alone
        for name, rs in runs.items():
            rates = [mean([r["rates"][i] for r in rs]) for i in range(2)]
            result[f"compose{name}_rates"] = rates
            result[f"compose{name}_rates_per_seed"] = [r["rates"] for r in rs]
            result[f"compose{name}_min_rate"] = min(rates)
            result[f"compose{name}_generic_object_rate"] = mean([r["generic"] for r in rs])
            result[f"compose{name}_max_constraint_residual"] = max(r["residual"] for r in rs)
            result[f"compose{name}_max_reg_rel_change"] = max(r["reg_change"] for r in rs)
            templates, padding = settings[name]
            result[f"compose{name}_settings"] = {"templates": templates or "reference",
                                                 "target_padding": padding}  # fmt: skip

    if "joint" in stages:
        # As the reg stage: the mean over the training seeds, each seed's rates beside it.
        per_seed = []
        for seed in train_seeds:
            tag = f"joint{seed_suffix(seed)}"
            overrides = [*joint_overrides(a, b), *pair_schedule, f"seed={seed}"]
            model = with_delta(train_recipe(args.joint_recipe, overrides, out / tag))
            per_seed.append([
                rate(model, a, "<new1>", f"{tag}_a"),
                rate(model, b, "<new2>", f"{tag}_b"),
            ])  # fmt: skip
            if seed == train_seeds[0]:
                diagnose(model, "<new2>", "joint_b")
        means = [mean([r[i] for r in per_seed]) for i in range(2)]
        result["joint_rates"] = means
        result["joint_rates_per_seed"] = per_seed
        result["joint_min_rate"] = min(means)

    if "compress" in stages:
        n = args.compress_seeds
        delta_a, _ = reg_run(0)
        full = Delta.load(delta_a)

        def concept_samples(delta, tag):
            report = metrics.evaluate_concept(with_delta(delta), judge, a, "<new1>", n,
                                              ("concept",))  # fmt: skip
            report.grid().save(out / f"grid_compress_{tag}.png")
            return report.rates["concept_rate"], report.samples["concept"].images

        full_rate, full_images = concept_samples(delta_a, "full")
        # Rank 0: the base K/V with the trained token row, the scale of the image fidelity.
        base_state = load_model(None, "toy").state_dict()
        rank0 = {k: (v if k == ROWS else base_state[k].clone()) for k, v in full.tensors.items()}
        rank0_rate, rank0_images = concept_samples((rank0, full.meta), "rank0")
        scale = (rank0_images - full_images).abs().mean()
        curve = [{"setting": "rank=0", "ranks": [0, 0], "size_ratio": 0.0,
                  "concept_rate": rank0_rate, "fidelity": round(rank0_rate / full_rate, 4),
                  "image_fidelity": 0.0}]  # fmt: skip
        settings = [("rank", r) for r in args.ranks.split(",")] + [("ratio", "0.6")]
        for kind, value in settings:
            path = out / "compress" / f"{kind}{value}.safetensors"
            path.parent.mkdir(exist_ok=True)
            cli("compress", str(delta_a), "-o", str(path), f"--{kind}", value)
            compressed = Delta.load(path)
            ranks = json.loads(compressed.meta["ranks"]).values()
            rate, images = concept_samples(path, f"{kind}{value}")
            curve.append({
                "setting": f"{kind}={value}", "ranks": [min(ranks), max(ranks)],
                "size_ratio": round(nbytes(compressed.tensors) / nbytes(full.tensors), 4),
                "concept_rate": rate, "fidelity": round(rate / max(full_rate, 1e-9), 4),
                "image_fidelity": round(float(1 - (images - full_images).abs().mean() / scale), 4),
            })  # fmt: skip
        print(f"compress curve of {delta_a}, {2 * n} images per point:\n"
              "  size = compressed / full delta tensor bytes; fidelity = concept_rate / the full "
              f"delta's {full_rate};\n  image fidelity = 1 - mean |x - x_full| / "
              "mean |x_rank0 - x_full| (same seeds)")  # fmt: skip
        for p in curve:
            print(f"  {p['setting']:>10}  ranks {p['ranks'][0]:>2}-{p['ranks'][1]:<2}  "
                  f"size {p['size_ratio']:.3f}  concept_rate {p['concept_rate']:.3f}  "
                  f"fidelity {p['fidelity']:.3f}  "
                  f"image fidelity {p['image_fidelity']:.3f}")  # fmt: skip
        head = curve[-1]  # the reference's rule, fixed in advance (not picked from the curve)
        result["compress_full_concept_rate"] = full_rate
        result["compress_curve"] = curve
        result["compress_setting"] = head["setting"]
        result["compress_size_ratio"] = head["size_ratio"]
        result["compress_fidelity_ratio"] = head["fidelity"]
        result["compress_image_fidelity"] = head["image_fidelity"]

    if diag:
        result[f"concept_b_rates_at_guidance_{args.diag_guidance:g}"] = diag
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
