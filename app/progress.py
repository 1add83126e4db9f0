"""The Lightning callback the app adds to a training run: progress lines and graceful stopping.

Added with Hydra overrides (``+callbacks.app_progress._target_=app.progress.ProgressLog``), so
``main.py`` and the recipes stay as they are. After every optimizer step it appends one JSON line
``{"step", "max_steps", "loss", "time"}`` to ``path``. When the file ``stop_file`` appears it asks
the trainer to stop after the current step: training then ends normally, so ``SaveWeights``
writes ``last.safetensors`` and the final samples are logged. If the run is killed instead
(SIGTERM/SIGINT), the current delta is still saved to ``checkpoints/last.safetensors``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

log = logging.getLogger(__name__)


class ProgressLog(pl.Callback):
    """Args:
    path: the JSON-lines progress file.
    stop_file: its existence asks training to stop after the current step.
    checkpoint_dir: where an interrupted run saves its delta (``last.safetensors``).
    """

    def __init__(self, path: str, stop_file: str, checkpoint_dir: str | None = None) -> None:
        self.path = Path(path)
        self.stop_file = Path(stop_file)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.start = time.time()

    def _write(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.time()
        self._write({"event": "start", "max_steps": trainer.max_steps, "time": 0.0})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank != 0:
            return
        loss = trainer.callback_metrics.get("train/loss")
        if loss is None and isinstance(outputs, dict):
            loss = outputs.get("loss")
        self._write(
            {
                "step": trainer.global_step,
                "max_steps": trainer.max_steps,
                "loss": float(loss) if loss is not None else None,
                "time": round(time.time() - self.start, 3),
            }
        )
        if self.stop_file.exists() and not trainer.should_stop:
            log.info("stop requested: ending after step %d", trainer.global_step)
            self._write({"event": "stopping", "step": trainer.global_step})
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        self._write({"event": "end", "step": trainer.global_step})

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Killed mid-run: keep what was learnt so far (written atomically)."""
        self._write({"event": "exception", "step": trainer.global_step, "error": repr(exception)})
        if self.checkpoint_dir is None or trainer.global_rank != 0 or trainer.global_step == 0:
            return
        from ldm.checkpoint import save_state_dict

        path = self.checkpoint_dir / "last.safetensors"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_state_dict(
                pl_module.export_state_dict(), path, metadata=pl_module.export_metadata()
            )
            log.info("interrupted at step %d: saved %s", trainer.global_step, path)
        except (OSError, RuntimeError, ValueError) as exc:
            log.warning("interrupted: could not save %s (%s)", path, exc)
