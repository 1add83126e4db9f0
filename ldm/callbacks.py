"""Lightning callbacks: weights as safetensors (never pickles) and sample grids during training."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch

from ldm.image_io import make_grid, to_pil

log = logging.getLogger(__name__)


class SaveWeights(pl.Callback):
    """Writes ``model.export_state_dict()`` (with ``model.export_metadata()`` in the header) to
    ``dirpath/{step}.safetensors`` and ``last``.

    The file is written to a temporary name and renamed, so an interrupted save never replaces
    a good file with a broken one.
    """

    def __init__(self, dirpath: str, every_n_steps: int = 0, save_last: bool = True) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.save_last = save_last

    def _save(self, pl_module: pl.LightningModule, name: str) -> None:
        from ldm.checkpoint import save_state_dict

        if pl_module.trainer.global_rank != 0:
            return
        path = self.dirpath / f"{name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_state_dict(pl_module.export_state_dict(), path, metadata=pl_module.export_metadata())
        log.info("saved %s", path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            self._save(pl_module, f"step_{step:06d}")

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last:
            self._save(pl_module, "last")


class LogSamples(pl.Callback):
    """Samples a fixed prompt list with fixed seeds every ``every_n_steps`` and saves a grid."""

    def __init__(
        self,
        dirpath: str,
        prompts: Sequence[str],
        every_n_steps: int = 500,
        steps: int = 50,
        guidance_scale: float = 5.0,
        seed: int = 0,
        at_end: bool = True,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.prompts = list(prompts)
        self.every_n_steps = every_n_steps
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.at_end = at_end

    @torch.no_grad()
    def _log(self, trainer, pl_module, tag: str) -> None:
        from ldm.generate import generate

        if trainer.global_rank != 0 or not self.prompts:
            return
        was_training = pl_module.training
        pl_module.eval()
        with pl_module.ema_scope():
            images = generate(
                pl_module,
                self.prompts,
                steps=self.steps,
                guidance_scale=self.guidance_scale,
                seed=self.seed,
                progress=False,
            )
        pl_module.train(was_training)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"{tag}.png"
        make_grid(to_pil(images)).save(path)
        log.info("sample grid %s", path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            self._log(trainer, pl_module, f"step_{step:06d}")

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end:
            self._log(trainer, pl_module, "final")
