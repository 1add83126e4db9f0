"""End-of-training toy-world evaluation of a personalized model (``ToyConceptEval``).

Enabled in the personalization recipes: when training ends it samples the prompt families of
:mod:`toyworld.metrics` for each learned concept (fixed seeds, DDIM 50, guidance 5.0), scores
them with the toy judge and writes ``metrics.json`` and ``eval_grid.png`` into the run folder.
With ``base_rates`` it also samples the class-word prompts once before training, on the
untouched base, for the ``base_concept_rate`` to compare with. The rates also go into
``trainer.callback_metrics`` as ``toy/<concept>/<rate>`` (and ``toy/min_concept_rate``), so
``main.py`` saves them in ``metrics.yaml`` and sweeps can optimise them.

It runs only where the judge applies -- the toy base (``base_ckpt`` is the shipped
``models/toy/toy_base.safetensors``, unless ``require_toy_base=false`` for a re-trained one),
toy-world images (32 px) and known concepts -- and logs one line and does nothing otherwise
(real photos, ``model=sd15``, the tiny test model), or when training stopped before
``max_steps`` (a cancelled run).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from PIL import Image

from toyworld import metrics
from toyworld.concepts import CONCEPTS
from toyworld.judge import INPUT_SIZE, Judge

log = logging.getLogger(__name__)

TOY_BASE = Path(__file__).resolve().parents[1] / "models" / "toy" / "toy_base.safetensors"


class ToyConceptEval(pl.Callback):
    """Judge-scored concept, prior and text-alignment rates at the end of training.

    Args:
        dirpath: folder for ``metrics.json`` and ``eval_grid.png`` (the run folder).
        concepts: ``{name, token}`` per learned concept (``toyworld.concepts`` names); entries
            with a null name are dropped (e.g. a recipe pointed at real photos).
        resolution: the training image size; anything but the toy world's 32 px skips.
        base_ckpt: the model config's ``ckpt`` (relative paths from the project root).
        require_toy_base: skip unless ``base_ckpt`` is the shipped toy base.
        seeds: images per prompt.
        families: prompt families of :func:`toyworld.metrics.evaluate_concept`.
        base_rates: also sample the class-word prompts on the base before training.
        steps, guidance_scale, seed: sampling settings (the toy base's by default).
    """

    def __init__(
        self,
        dirpath: str,
        concepts: Sequence[Mapping[str, Any]],
        resolution: int = INPUT_SIZE,
        base_ckpt: str | None = None,
        require_toy_base: bool = True,
        seeds: int = 8,
        families: Sequence[str] = ("concept", "class", "align"),
        base_rates: bool = True,
        steps: int = metrics.STEPS,
        guidance_scale: float = metrics.GUIDANCE,
        seed: int = metrics.SEED,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.concepts = [dict(c) for c in concepts if c.get("name")]
        self.resolution = resolution
        self.base_ckpt = base_ckpt
        self.require_toy_base = require_toy_base
        self.seeds = seeds
        self.families = tuple(families)
        self.base_rates = base_rates
        self.sample_kw = {"steps": steps, "guidance_scale": guidance_scale, "seed": seed}
        self.enabled = self._check()
        self.base: dict[str, metrics.Report] = {}

    def _check(self) -> bool:
        if self.resolution != INPUT_SIZE:
            log.info("toy evaluation skipped: %d px images, the judge reads %d px toy-world "
                     "images", self.resolution, INPUT_SIZE)  # fmt: skip
            return False
        if self.require_toy_base and not is_toy_base(self.base_ckpt):
            log.info("toy evaluation skipped: the base %s is not the toy base", self.base_ckpt)
            return False
        if not self.concepts:
            log.info("toy evaluation skipped: no toy-world concept configured")
            return False
        unknown = [c["name"] for c in self.concepts if c["name"] not in CONCEPTS]
        if unknown:
            log.info("toy evaluation skipped: %s not toy-world concepts", unknown)
            return False
        return True

    def _evaluate(self, pl_module, families: Sequence[str]) -> dict:
        was_training = pl_module.training
        pl_module.eval()
        # Building the judge draws random initial weights: keep the training's random stream.
        with torch.random.fork_rng(devices=[]):
            judge = Judge.load()
        try:
            with pl_module.ema_scope():
                return {
                    c["name"]: metrics.evaluate_concept(
                        pl_module, judge, c["name"], c.get("token"), self.seeds, families,
                        **self.sample_kw,
                    )
                    for c in self.concepts
                }  # fmt: skip
        finally:
            pl_module.train(was_training)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled and self.base_rates and trainer.global_rank == 0:
            log.info("toy evaluation: class-word prompts on the base model")
            self.base = self._evaluate(pl_module, ("class",))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or trainer.global_rank != 0:
            return
        if trainer.max_steps > 0 and trainer.global_step < trainer.max_steps:
            log.info("toy evaluation skipped: training stopped at step %d of %d",
                     trainer.global_step, trainer.max_steps)  # fmt: skip
            return
        log.info("toy evaluation: sampling %s", self.families)
        reports = self._evaluate(pl_module, self.families)
        out: dict[str, Any] = {"step": trainer.global_step, "seeds_per_prompt": self.seeds}
        for name, report in reports.items():
            rates = dict(report.rates)
            if name in self.base:
                rates["base_concept_rate"] = self.base[name].rates["class_concept_rate"]
            out[name] = rates
        concept_rates = [r.rates["concept_rate"] for r in reports.values()
                         if "concept_rate" in r.rates]  # fmt: skip
        if concept_rates:
            out["min_concept_rate"] = min(concept_rates)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / "metrics.json").write_text(json.dumps(out, indent=2) + "\n")
        grids = [self.base[n].grid() for n in self.base] + [r.grid() for r in reports.values()]
        stack(grids).save(self.dirpath / "eval_grid.png")
        for key, value in flatten(out).items():
            trainer.callback_metrics[f"toy/{key}"] = torch.tensor(float(value))
        log.info("toy evaluation: %s -> %s", json.dumps(out), self.dirpath / "metrics.json")


def is_toy_base(ckpt: str | Path | None) -> bool:
    """Whether ``ckpt`` (relative to the project root unless absolute) is the shipped toy base."""
    from ldm.models.diffusion.ddpm import resolve_path

    if ckpt is None:
        return False
    path = resolve_path(ckpt)
    return path.exists() and path.resolve() == TOY_BASE.resolve()


def flatten(rates: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested numeric entries as ``a/b`` keys."""
    out: dict[str, float] = {}
    for k, v in rates.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, int | float):
            out[f"{prefix}{k}"] = float(v)
    return out


def stack(images: Sequence[Image.Image], pad: int = 4) -> Image.Image:
    """Grids one above the other, left-aligned, on white."""
    width = max(im.width for im in images)
    height = sum(im.height for im in images) + pad * (len(images) - 1)
    canvas = Image.new("RGB", (width, height), "white")
    y = 0
    for im in images:
        canvas.paste(im, (0, y))
        y += im.height + pad
    return canvas
