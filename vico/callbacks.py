"""Training callbacks for ViCo: sample grids with a reference image, reference-layout saves."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl

from ldm.callbacks import LogSamples

log = logging.getLogger(__name__)


class LogViCoSamples(LogSamples):
    """:class:`~ldm.callbacks.LogSamples` with the visual condition on.

    Args:
        image: the reference image; ``None`` takes the first training image.
        **kwargs: ``LogSamples`` arguments.
    """

    def __init__(self, *args, image: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.image = image

    def reference(self, trainer: pl.Trainer) -> Path:
        if self.image:
            return Path(self.image)
        return Path(trainer.datamodule.train_set.paths[0])

    def _log(self, trainer, pl_module, tag: str) -> None:
        if trainer.global_rank != 0 or not self.prompts:
            return
        with pl_module.visual_condition(self.reference(trainer), self.prompts):
            super()._log(trainer, pl_module, tag)


class SaveReferenceLayout(pl.Callback):
    """Also writes ``embeddings_gs-N.pt`` / ``cross_attention-N.pt`` (the reference's files)
    every ``every_n_steps`` and at the end (N = the global step)."""

    def __init__(self, dirpath: str, every_n_steps: int = 0, save_last: bool = True) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.save_last = save_last

    def _save(self, trainer: pl.Trainer, pl_module) -> None:
        from vico.formats import to_reference

        if trainer.global_rank != 0:
            return
        paths = to_reference(
            pl_module.export_state_dict(),
            pl_module.export_metadata(),
            self.dirpath,
            step=trainer.global_step,
            token_id=pl_module.reference_token_id(),
        )
        log.info("saved %s and %s", *paths)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last:
            self._save(trainer, pl_module)
