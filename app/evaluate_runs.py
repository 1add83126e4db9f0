"""The Compare page's job: ``python -m app.evaluate_runs --out DIR RUN [RUN ...]``.

Evaluates each run as ``evaluate.py`` does (same pipeline, scorers and report), with the app's
settings in their own folder ``<run>/eval/app_<prompts>_<n>x<steps>/`` (so they never clash with
an evaluation made on the command line), then writes the comparison of all runs into ``--out``
and ``app_result.json`` listing the report files. Prompts: the toy-world families for a bundled
toy concept, else ``app/prompts/generic.txt``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from app.methods import CONFIG_DIR, ROOT  # noqa: E402

GENERIC = Path(__file__).with_name("prompts") / "generic.txt"
log = logging.getLogger("app.evaluate_runs")


def config(overrides: list[str], out: Path):
    """``configs/evaluate.yaml`` composed as Hydra would, its runtime folder set to ``out``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("evaluate", overrides=overrides, return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(out)
    cfg.hydra.runtime.cwd = str(ROOT)
    HydraConfig.instance().set_config(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-samples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import evaluate
    from evaluation.compare import write_comparison
    from evaluation.pipeline import evaluate_run
    from evaluation.runs import load_run

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, reports = [], []
    try:
        for i, run in enumerate(args.runs):
            info = load_run(run)
            prompts = "toy" if info.toy_concept else str(GENERIC)
            name = "toy" if info.toy_concept else "generic"
            outdir = Path(run) / "eval" / f"app_{name}_{args.n_samples}x{args.steps}"
            cfg = config(
                [f"run={run}", f"prompts={prompts}", f"n_samples={args.n_samples}",
                 f"batch_size={args.n_samples}", f"sampler.steps={args.steps}",
                 f"outdir={outdir}"],
                out,
            )  # fmt: skip
            log.info("evaluating run %d of %d: %s", i + 1, len(args.runs), run)
            scorers = evaluate.make_scorers(cfg)
            results.append(evaluate_run(cfg, run, scorers, evaluate.device_of(cfg)))
            reports.append(str(outdir / "report.html"))
        comparison = None
        if len(results) > 1:
            comparison = str(write_comparison(out, results)["html"])
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    (out / "app_result.json").write_text(
        json.dumps({"reports": reports, "comparison": comparison, "runs": args.runs}, indent=1)
    )
    log.info("done: %s", comparison or reports[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
