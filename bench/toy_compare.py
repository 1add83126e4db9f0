"""Compare personalization set-ups on one toy concept with one command: train each (short runs
of the project's recipes on the shipped toy base), evaluate them all with ``evaluate.py
--config-name compare`` (same prompts and seeds), and check the table against the method
benchmarks' own scoring (``toyworld.metrics.evaluate_concept``, which ``bench/toy_custom.py``
uses) on the same weights.

Set-ups (:data:`SETUPS`): Custom Diffusion without regularization (``finetune_noreg``), with
generated regularization (``finetune_gen``), with a folder of real captioned images
(``finetune_real``), and Cross Initialization alone and with Custom Diffusion (the toy
analogues ``finetune_crossinit_toy``, ``finetune_cd_cr_toy``); a set-up whose recipe does not
exist is skipped and listed.

Outputs under ``--out`` (default ``logs/toy_compare/<concept>``, plus a hash of ``--steps`` /
``--extra`` when given): one run folder per set-up (reused when its weights exist),
``comparison/comparison.{md,html,json}``, ``comparison/alignment_toy_judge.svg``, and each
run's ``eval/toy/report.html``. The last stdout line is one JSON object: per set-up
``concept_rate``, ``text_align_rate``, ``prior_concept_rate``; ``max_abs_diff`` between the
table and ``toyworld.metrics`` (0 when they agree).

    python bench/toy_compare.py [--concept outlined_triangle] [--seeds 8] [--steps N]
"""

from __future__ import annotations

import argparse
import hashlib
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
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

log = logging.getLogger("toy_compare")

# name -> (recipe, overrides); {concept} and {cls} are filled in. Custom Diffusion learns the
# concept as "<new1> {cls}", Cross Initialization (its toy recipes) as "v1* v2* {cls}".
CONCEPT = ["prepare.concept.name={concept}",
           'data.train.concepts.0.instance_prompt="a photo of a <new1> {cls}"']  # fmt: skip
SETUPS: dict[str, tuple[str, list[str]]] = {
    "cd_noreg": ("finetune_noreg", CONCEPT),
    "cd_gen": ("finetune_gen", [*CONCEPT, 'prepare.class_images.prompt="a photo of a {cls}"']),
    "cd_real": ("finetune_real", [*CONCEPT, "prepare.class_images.class_word={cls}"]),
    "crossinit": ("finetune_crossinit_toy", ["concept={concept}", "class_word={cls}"]),
    "cd_cr": ("finetune_cd_cr_toy", ["concept={concept}", "class_word={cls}"]),
}
# The recipes' own end-of-training toy evaluation is left out: the comparison scores every run.
COMMON = ["+trainer.enable_progress_bar=false", "callbacks.log_samples=null", "logger=null",
          "++callbacks.toy_eval=null"]  # fmt: skip


def run(cmd: list[str], log_file: Path) -> None:
    log.info("%s  (log: %s)", " ".join(cmd[1:]), log_file)
    with log_file.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")


def train(name: str, recipe: str, overrides: list[str], out: Path) -> Path:
    """``python main.py --config-name RECIPE`` into ``out/name`` (skipped if trained)."""
    folder = out / name
    if (folder / "checkpoints" / "last.safetensors").exists():
        log.info("%s: reusing %s", name, folder)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "main.py", "--config-name", recipe, f"hydra.run.dir={folder}",
           *COMMON, *overrides]  # fmt: skip
    start = time.perf_counter()
    run(cmd, out / f"train_{name}.log")
    log.info("%s trained in %.0f s", name, time.perf_counter() - start)
    return folder


def check(metrics: dict, concept: str, seeds: int) -> dict:
    """The method benchmarks' rates on the same weights, and the table's, side by side."""
    from custom.delta import apply_delta
    from ldm import load_model
    from toyworld import metrics as toy_metrics
    from toyworld.judge import Judge

    model = load_model(None, "toy")
    apply_delta(model, metrics["weights"])
    token = metrics["concept_phrase"].rsplit(" ", 1)[0]
    rates = toy_metrics.evaluate_concept(model.eval(), Judge.load(), concept, token, seeds).rates
    agg = metrics["aggregate"]
    ours = {
        "concept_rate": agg["concept"]["judge_concept"],
        "text_align_rate": agg["align"]["judge_text"],
        "class_concept_rate": agg["prior"]["judge_concept"],
    }  # toyworld.metrics rounds its rates to 4 decimals
    return {"toyworld_metrics": {k: rates[k] for k in ours}, "evaluate": ours,
            "max_abs_diff": max(abs(rates[k] - round(v, 4)) for k, v in ours.items())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="outlined_triangle", help="toyworld.concepts name")
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--seeds", type=int, default=8, help="images per prompt")
    parser.add_argument("--steps", type=int, default=None, help="default: each recipe's own")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every run")
    parser.add_argument("--no-check", action="store_true", help="skip the toyworld.metrics check")
    parser.add_argument("--out", default=None, help="default: logs/toy_compare/<concept>")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from toyworld.concepts import CONCEPTS
    from toyworld.metrics import SEED

    t0 = time.perf_counter()
    cls = CONCEPTS[args.concept].class_word
    extra = [*args.extra, *([f"trainer.max_steps={args.steps}"] if args.steps else [])]
    name = args.concept + (
        f"_{hashlib.sha1(' '.join(extra).encode()).hexdigest()[:8]}" if extra else ""
    )
    out = Path(args.out or ROOT / "logs" / "toy_compare" / name).resolve()  # runs are reused
    out.mkdir(parents=True, exist_ok=True)
    runs, skipped = {}, {}
    for name in args.setups.split(","):
        recipe, overrides = SETUPS[name]
        if not (ROOT / "configs" / f"{recipe}.yaml").exists():
            skipped[name] = f"no recipe configs/{recipe}.yaml"
            log.warning("%s: skipped (%s)", name, skipped[name])
            continue
        filled = [o.format(concept=args.concept, cls=cls) for o in overrides]
        runs[name] = train(name, recipe, [*filled, *extra], out)

    comparison = out / "comparison"
    cmd = [sys.executable, "evaluate.py", "--config-name", "compare",
           f"runs=[{','.join(str(r) for r in runs.values())}]", "prompts=toy",
           f"n_samples={args.seeds}", f"batch_size={args.seeds}", f"seed={SEED}",
           f"out={comparison}", f"hydra.run.dir={comparison}"]  # fmt: skip
    run(cmd, out / "compare.log")

    result: dict = {"concept": args.concept, "seeds_per_prompt": args.seeds, "setups": {}}
    diffs = []
    for name, folder in runs.items():
        m = json.loads((folder / "eval" / "toy" / "metrics.json").read_text())
        agg = m["aggregate"]
        entry = {
            "label": m["label"],
            "step": m["step"],
            "concept_rate": agg["concept"]["judge_concept"],
            "text_align_rate": agg["align"]["judge_text"],
            "align_concept_rate": agg["align"]["judge_concept"],
            "prior_concept_rate": agg["prior"]["judge_concept"],
            "report": m["report"],
        }
        if not args.no_check:
            entry["check"] = check(m, args.concept, args.seeds)
            diffs.append(entry["check"]["max_abs_diff"])
        result["setups"][name] = entry
    result["skipped"] = skipped
    result["max_abs_diff"] = max(diffs) if diffs else None
    result["table"] = str(comparison / "comparison.md")
    result["html"] = str(comparison / "comparison.html")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print((comparison / "comparison.md").read_text())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
