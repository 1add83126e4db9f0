"""Cross Initialization in the toy world: does the cross-initialised run reach a baseline
textual-inversion run's concept fidelity in at most half the steps, and is CD + CR at least as
good as Custom Diffusion alone?

The celebrity list's analogue is the names of the toy world's known objects
(``toyworld/names.txt``: "red circle", "blue square", ...). Four fine-tuning runs of the shipped
toy base, through the toy recipes (``configs/finetune_crossinit_toy.yaml``,
``configs/finetune_cd_cr_toy.yaml``; batch 8, their learning rates, seed 0):

- ``cross``: Cross Initialization, two tokens "v1* v2*", concept ``--concept``;
- ``baseline``: the same with classic textual-inversion init (``--baseline words``: the input rows
  of ``--init-words``) or ``random`` rows, everything else equal;
- ``cd``: Custom Diffusion alone (K/V + the two tokens at its own rate, the reference's
  rare-token init), concept ``--cd-concept``;
- ``cd_cr``: the same K/V with the Cross-Init tokens at the Cross-Init rate (CD + CR).

Every ``--eval-every`` steps each run samples "a photo of a v1* v2* <class>" for ``--seeds``
seeds (DDIM ``--sample-steps``, guidance 5, the same noise each time) and the toy judge scores
concept fidelity: the fraction of images in which it finds the concept. The target fidelity is
the baseline's at its last step; ``steps_to_fidelity_*`` is the first evaluated step at which a
run reaches it (null: never). Both curves are printed; the last stdout line is JSON with
``steps_to_fidelity_cross``, ``steps_to_fidelity_baseline``, ``cd_cr_fidelity``,
``cd_fidelity`` (fidelity at ``--cd-steps``) and the curves.

    python bench/toy_crossinit.py [--steps 400] [--cd-steps 200] [--baseline words|random]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from ldm.generate import generate  # noqa: E402
from main import compose_config  # noqa: E402
from toyworld.judge import Judge  # noqa: E402

log = logging.getLogger("toy_crossinit")
GUIDANCE = 5.0  # the toy base's shipped guidance scale
TOKENS = ["v1*", "v2*"]
CD_INIT_IDS = [[42170], [47629]]  # Custom Diffusion's reference inits ("ktn", "pll")
CR_KEYS = ("placeholder_tokens", "token_learning_rate", "init", "names", "init_words",
           "init_seed", "reg_weight")  # fmt: skip


class FidelityCurve(pl.Callback):
    """Concept fidelity of the model being trained, at step 0 and every ``every`` steps."""

    def __init__(self, judge: Judge, concept: str, prompts: list[str], seeds: int, steps: int,
                 every: int) -> None:  # fmt: skip
        self.judge, self.concept, self.prompts = judge, concept, prompts
        self.seeds, self.steps, self.every = seeds, steps, every
        self.curve: list[tuple[int, float]] = []
        self.eval_seconds = 0.0

    @torch.no_grad()
    def evaluate(self, model: pl.LightningModule, step: int) -> None:
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        images = torch.cat([
            generate(model, [p] * self.seeds, steps=self.steps, guidance_scale=GUIDANCE,
                     seed=1000, progress=False)
            for p in self.prompts
        ])  # fmt: skip
        model.train(was_training)
        rate = float(self.judge.has_concept(images * 2 - 1, self.concept).float().mean())
        self.curve.append((step, round(rate, 4)))
        self.eval_seconds += time.perf_counter() - start
        log.info("step %d: fidelity %.3f", step, rate)

    def on_train_start(self, trainer, pl_module) -> None:
        self.evaluate(pl_module, 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # Dense early (the fast runs converge within tens of steps), then every ``every``.
        if step in (10, 25, 50, 75) or step % self.every == 0 or step == trainer.max_steps:
            self.evaluate(pl_module, step)


def run(name: str, recipe: str, overrides: list[str], args, judge: Judge, concept: str,
        steps: int, model_edit=None) -> dict:  # fmt: skip
    """Fine-tune with ``recipe`` for ``steps`` steps; returns the fidelity curve and timings."""
    out = Path(tempfile.mkdtemp(prefix=f"{name}_", dir=args.workdir))
    cfg = compose_config(recipe, [f"concept={concept}", f"trainer.max_steps={steps}",
                                  f"seed={args.seed}", *overrides], out)  # fmt: skip
    cfg.data.train.phrase = args.phrase.replace("{class_word}", cfg.class_word)
    if model_edit is not None:
        with open_dict(cfg):
            model_edit(cfg)
    from main import run_prepare

    pl.seed_everything(cfg.seed, workers=True)
    run_prepare(cfg)  # exports the concept's images into the run folder
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    subject = cfg.data.train.phrase.format(" ".join(TOKENS))
    prompts = [t.format(subject) for t in cfg.data.train.templates]  # the training captions
    curve = FidelityCurve(judge, concept, prompts, args.seeds, args.sample_steps, args.eval_every)
    trainer = instantiate(cfg.trainer, callbacks=[curve], logger=False, enable_progress_bar=False,
                          enable_model_summary=False, accelerator="cpu")  # fmt: skip
    rows = model.cond_stage_model.token_embedding.placeholder_weight
    init_norms = [round(float(x), 3) for x in rows.detach().norm(dim=1)]
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    rows = model.cond_stage_model.token_embedding.placeholder_weight
    final_norms = [round(float(x), 3) for x in rows.detach().norm(dim=1)]
    seconds = time.perf_counter() - start - curve.eval_seconds
    lrs = [round(g["lr"], 8) for g in trainer.optimizers[0].param_groups]
    log.info("%s: %d steps in %.0f s of training (%.2f it/s), lrs %s", name, steps, seconds,
             steps / seconds, lrs)  # fmt: skip
    return {"curve": curve.curve, "train_seconds": round(seconds, 1), "lrs": lrs,
            "token_norms": {"init": init_norms, "final": final_norms}}  # fmt: skip


def first_reaching(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, rate in curve if rate >= target), None)


def as_custom_diffusion(cfg) -> None:
    """The CD + CR recipe's config turned into Custom Diffusion alone (same K/V, data, steps)."""
    cfg.model._target_ = "custom.model.CustomDiffusion"
    cfg.model.modifier_tokens = TOKENS
    cfg.model.initializer_ids = CD_INIT_IDS
    for key in CR_KEYS:
        cfg.model.pop(key, None)
    cfg.data.train.tokens = TOKENS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="outlined_triangle")
    parser.add_argument("--cd-concept", default="outlined_triangle")
    parser.add_argument("--steps", type=int, default=400, help="cross / baseline steps")
    parser.add_argument("--cd-steps", type=int, default=400, help="cd / cd_cr steps")
    parser.add_argument("--baseline", choices=["words", "random"], default="words")
    parser.add_argument("--init-words", nargs=2, default=["triangle", "triangle"])
    parser.add_argument(
        "--phrase",
        default="{} {class_word}",
        help="caption subject ({} = the tokens), e.g. '{}' drops the class word",
    )
    parser.add_argument("--eval-every", type=int, default=50, help="after step 100")
    parser.add_argument("--seeds", type=int, default=32)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", default="cross,baseline,cd,cd_cr")
    parser.add_argument("--workdir", default=None, help="run folders (default: a temp dir)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("pytorch_lightning", "lightning", "lightning_fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="toy_crossinit_")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    judge = Judge.load()
    wanted = args.runs.split(",")
    baseline = (["model.init=words", f"model.init_words=[{','.join(args.init_words)}]"]
                if args.baseline == "words" else ["model.init=random"])  # fmt: skip
    plan = {
        "cross": ("finetune_crossinit_toy", [], args.concept, args.steps, None),
        "baseline": ("finetune_crossinit_toy", baseline, args.concept, args.steps, None),
        "cd": ("finetune_cd_cr_toy", [], args.cd_concept, args.cd_steps, as_custom_diffusion),
        "cd_cr": ("finetune_cd_cr_toy", [], args.cd_concept, args.cd_steps, None),
    }
    results = {}
    t0 = time.perf_counter()
    for name in wanted:
        recipe, overrides, concept, steps, edit = plan[name]
        results[name] = run(name, recipe, overrides, args, judge, concept, steps, edit)
        print(f"{name:9s} " + " ".join(f"{s}:{r:.2f}" for s, r in results[name]["curve"]),
              flush=True)  # fmt: skip

    out: dict = {}
    if "cross" in results and "baseline" in results:
        target = results["baseline"]["curve"][-1][1]
        out["target_fidelity"] = target
        if target <= 0:  # the baseline never learned the concept: nothing to reach
            log.warning("the baseline's final fidelity is 0: steps_to_fidelity are undefined")
            target = float("inf")
        out["steps_to_fidelity_cross"] = first_reaching(results["cross"]["curve"], target)
        out["steps_to_fidelity_baseline"] = first_reaching(results["baseline"]["curve"], target)
        sc, sb = out["steps_to_fidelity_cross"], out["steps_to_fidelity_baseline"]
        out["cross_within_half"] = sc is not None and sb is not None and 2 * sc <= sb
    if "cd" in results and "cd_cr" in results:
        out["cd_cr_fidelity"] = results["cd_cr"]["curve"][-1][1]
        out["cd_fidelity"] = results["cd"]["curve"][-1][1]
        out["cd_cr_at_least_cd"] = out["cd_cr_fidelity"] >= out["cd_fidelity"]
    out.update({
        "concept": args.concept, "cd_concept": args.cd_concept, "baseline": args.baseline,
        "init_words": args.init_words if args.baseline == "words" else None,
        "steps": args.steps, "cd_steps": args.cd_steps, "seeds": args.seeds,
        "sample_steps": args.sample_steps, "eval_every": args.eval_every,
        "curves": {k: v["curve"] for k, v in results.items()},
        "train_seconds": {k: v["train_seconds"] for k, v in results.items()},
        "lrs": {k: v["lrs"] for k, v in results.items()},
        "token_norms": {k: v["token_norms"] for k, v in results.items()},
        "total_seconds": round(time.perf_counter() - t0, 1),
    })  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
