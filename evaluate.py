"""Evaluate trained runs: ``python evaluate.py run=logs/<task>/runs/<time> [prompts=...]``.

Samples every prompt with fixed seeds and file names (existing images are kept), scores them
with the configured scorers (``scorers=[toy_judge]``, ``[clip,dino]``, ...) and writes
``metrics.json`` and ``report.html`` into ``<run>/eval/<prompts>/``. With
``--config-name compare runs=[...]`` it evaluates several runs (or Hydra sweep folders) the same
way and writes one comparison table and alignment plot. See ``evaluation/`` and
``configs/evaluate.yaml``.

A separate entry point rather than a mode of ``sample.py``: evaluation has its own loop (prompts
x seeds, resumable), its own config group (scorers) and its own outputs, and ``sample.py`` stays
the one-prompt sampler.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import hydra  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

log = logging.getLogger(__name__)


def make_scorers(cfg: DictConfig) -> dict:
    scorers = {name: instantiate(c) for name, c in (cfg.get("scorers") or {}).items() if c}
    if not scorers:
        raise SystemExit("error: no scorers configured (e.g. 'scorers=[toy_judge]')")
    return scorers


def device_of(cfg: DictConfig) -> torch.device:
    from ldm.util import default_device

    return default_device() if cfg.device == "auto" else torch.device(cfg.device)


def evaluate(cfg: DictConfig) -> dict:
    """One run (``cfg.run``): returns its metrics."""
    from evaluation.pipeline import evaluate_run

    return evaluate_run(cfg, cfg.run, make_scorers(cfg), device_of(cfg))


def compare(cfg: DictConfig) -> dict[str, Path]:
    """Every run below ``cfg.runs``, then the comparison files in ``cfg.out``."""
    from evaluation.compare import write_comparison
    from evaluation.pipeline import evaluate_run
    from evaluation.runs import find_runs

    if cfg.get("outdir"):
        raise SystemExit("error: outdir= would be shared by every run; leave it null to compare")
    specs = [cfg.runs] if isinstance(cfg.runs, str) else list(cfg.runs)
    runs = [run for spec in specs for run in find_runs(spec)]
    scorers, device = make_scorers(cfg), device_of(cfg)
    results = [evaluate_run(cfg, run, scorers, device) for run in runs]
    files = write_comparison(Path(cfg.out), results)
    log.info("comparison of %d runs: %s", len(results), files["html"])
    print(files["md"].read_text())
    return files


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        compare(cfg) if cfg.get("runs") is not None else evaluate(cfg)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
