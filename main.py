"""Train or fine-tune: ``python main.py [--config-name RECIPE] [overrides]``.

Builds the datamodule, model, callbacks, logger and trainer from the Hydra config, fits, and
returns ``cfg.optimized_metric`` (for sweepers). Outputs go to ``logs/<task_name>/...``.
``resume=PATH|auto`` continues a delta-saving run (Custom Diffusion) from a saved delta.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import hydra  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

log = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def compose_config(name: str, overrides: list[str], output_dir: str | Path) -> DictConfig:
    """The root config ``python main.py --config-name NAME overrides`` would run, writing into
    ``output_dir`` (for scripts and tests that call :func:`train` in-process)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(output_dir)
    cfg.hydra.runtime.cwd = str(CONFIG_DIR.parent)
    HydraConfig.instance().set_config(cfg)
    return cfg


def run_prepare(cfg: DictConfig) -> None:
    """Run the ``cfg.prepare`` steps in order (``_target_`` callables: export a concept's images,
    generate regularization images, ...), before the data they write is read. Null steps are
    skipped, and so are all steps in the DDP processes Lightning starts (``LOCAL_RANK`` > 0) at
    ``fit``, after local rank 0 has prepared the files."""
    if int(os.environ.get("LOCAL_RANK", "0")) > 0:
        return
    for name, step in (cfg.get("prepare") or {}).items():
        if step:
            log.info("prepare %s", name)
            instantiate(step)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured model; returns the final callback metrics as floats."""
    pl.seed_everything(cfg.seed, workers=True)
    run_prepare(cfg)
    # Again: a prepare step that builds a model or samples (skipped when its output is cached)
    # must not change the run's random stream.
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    log.info("%s: %s", type(model).__name__, model.summary())
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    if cfg.get("resume"):  # a saved file, or "auto": the newest in this run's checkpoints/
        saves = (cfg.get("callbacks") or {}).get("save_weights") or {}
        folder = saves.get("dirpath") or Path(cfg.paths.output_dir) / "checkpoints"
        callbacks.append(model.resume_callback(cfg.resume, folder))
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    out = Path(cfg.paths.output_dir)
    if trainer.global_rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg.model, out / "model_config.yaml", resolve=True)
    trainer.fit(model, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.global_rank == 0:
        OmegaConf.save(OmegaConf.create(metrics), out / "metrics.yaml")
    return metrics


def run_stages(cfg: DictConfig) -> None:
    """Run ``cfg.stages`` in order before the main fit (e.g. the autoencoder of toy_pretrain).

    A stage's ``model`` replaces the main model; its other keys are merged into the config. Each
    writes to ``<output_dir>/<stage name>`` and is skipped when its final weights already exist.
    """
    for name, stage in (cfg.get("stages") or {}).items():
        stage_cfg = OmegaConf.merge(cfg, {k: v for k, v in stage.items() if k != "model"})
        # Resolve the stage model against the full config before it replaces the main model.
        stage_cfg.model = OmegaConf.to_container(stage.model, resolve=True)
        stage_cfg.stages = None
        stage_cfg.paths.output_dir = str(Path(cfg.paths.output_dir) / name)
        last = Path(stage_cfg.paths.output_dir) / "checkpoints" / "last.safetensors"
        if last.exists():
            log.info("stage %s: %s exists, skipping", name, last)
            continue
        log.info("stage %s", name)
        train(stage_cfg)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    run_stages(cfg)
    metrics = train(cfg)
    key = cfg.get("optimized_metric")
    return metrics.get(key) if key else None


if __name__ == "__main__":
    main()
