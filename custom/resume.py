"""Resuming a Custom Diffusion run from its last saved delta.

Deltas are written atomically (a temporary file renamed into place), so a run that crashes
keeps every delta it saved, whole. ``python main.py ... +resume=PATH`` starts a run from the
delta at PATH; ``+resume=auto`` from the newest delta in the run folder's ``checkpoints/``
(re-run with the same ``hydra.run.dir``), or from scratch when there is none. The delta's
tensors are copied into the model (after the base check of :func:`~custom.delta.apply_delta`)
and training continues at the delta's step up to ``trainer.max_steps``, so step-named saves
keep their numbering.

What a delta does not hold starts afresh: the AdamW moments (Adam's bias correction makes its
first updates lr-sized again), the data order and the random state. A resumed run is therefore
a continuation, not a bit-exact replay of the uninterrupted one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytorch_lightning as pl

from custom.delta import apply_delta, load_delta

log = logging.getLogger(__name__)

AUTO = "auto"


def newest_delta(folder: str | Path) -> Path | None:
    """The delta with the highest step in ``folder`` (files that are not deltas are skipped)."""
    best: tuple[int, float, Path] | None = None
    for path in Path(folder).glob("*.safetensors"):
        try:
            _, meta = load_delta(path)
        except ValueError as exc:
            log.warning("not resuming from %s: %s", path, exc)
            continue
        key = (int(meta.get("step", 0)), path.stat().st_mtime, path)
        best = key if best is None or key > best else best
    return best[2] if best else None


def set_global_step(trainer: pl.Trainer, step: int) -> None:
    """Start the fit loop's step counters at ``step`` (what a Lightning checkpoint restores)."""
    loop = trainer.fit_loop.epoch_loop
    progress = loop.automatic_optimization.optim_progress.optimizer.step.total
    progress.ready = progress.completed = step
    loop._batches_that_stepped = step  # the step loggers see


class ResumeFromDelta(pl.Callback):
    """Load a delta into the model when fitting starts and continue from its step.

    Args:
        path: a delta file, or ``auto`` for the newest delta in ``checkpoints``.
        checkpoints: the run's delta folder (read for ``auto``).
    """

    def __init__(self, path: str | Path, checkpoints: str | Path | None = None) -> None:
        self.path = str(path)
        self.checkpoints = Path(checkpoints) if checkpoints else None
        self.step = 0

    def resolve(self) -> Path | None:
        if self.path != AUTO:
            path = Path(self.path)
            if not path.is_file():
                raise FileNotFoundError(f"resume: no delta at {path}")
            return path
        if self.checkpoints is None:
            raise ValueError("resume=auto needs the run's checkpoints folder")
        path = newest_delta(self.checkpoints) if self.checkpoints.is_dir() else None
        if path is None:
            log.info("resume=auto: no delta in %s, starting from scratch", self.checkpoints)
        return path

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        path = self.resolve()
        if path is None:
            return
        meta = apply_delta(pl_module, path)
        tokens = json.loads(meta.get("tokens", "[]"))
        if tokens != list(getattr(pl_module, "modifier_tokens", tokens)):
            raise ValueError(f"resume: the delta's tokens {tokens} are not the run's")
        self.step = int(meta.get("step", 0))
        log.info("resuming from %s at step %d", path, self.step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.step:
            set_global_step(trainer, self.step)
