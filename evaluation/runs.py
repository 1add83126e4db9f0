"""Training runs as evaluation sees them: where they are, what they trained, how to rebuild them.

A run is a folder written by ``main.py``: ``.hydra/config.yaml`` (the composed config) and
``checkpoints/last.safetensors`` (what the method exports: a delta with metadata, or a whole
state dict). :func:`find_runs` also accepts a Hydra multirun folder or any folder holding runs.
:func:`load_run` reads a run without building anything; :func:`build_model` rebuilds the model
the run trained (its base from the run's model config) and loads the run's weights into it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CONFIG = Path(".hydra") / "config.yaml"
EXPORT_CONCEPT = "toyworld.concepts.export_concept"


@dataclass
class RunInfo:
    """What evaluation needs to know about a run (nothing built yet)."""

    dir: Path
    config: DictConfig  # the run's config with its paths pointing at this folder
    weights: Path | None
    label: str
    tokens: list[str] = field(default_factory=list)
    instance_prompt: str | None = None
    instance_dir: Path | None = None
    toy_concept: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def method(self) -> str:
        target = str(OmegaConf.select(self.config, "model._target_", default="") or "")
        return self.metadata.get("method") or target.rsplit(".", 1)[-1] or "?"

    @property
    def step(self) -> int | None:
        step = self.metadata.get("step")
        return int(step) if step is not None else None


def is_run(path: Path) -> bool:
    return (path / CONFIG).is_file()


def has_weights(path: Path) -> bool:
    return (path / "checkpoints").is_dir()


def _sort_key(path: Path) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parts)


def find_runs(path: str | Path) -> list[Path]:
    """A run folder -> [it]; a sweep or any folder -> the runs below it that saved weights
    (``checkpoints/``), in numeric order."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such run or folder: {path}")
    if is_run(path):
        return [path]
    found = {p.parent.parent for p in path.rglob(str(CONFIG))}
    runs = sorted((r for r in found if has_weights(r)), key=_sort_key)
    if not runs:
        raise FileNotFoundError(f"{path}: no runs below it ({CONFIG} and checkpoints/)")
    return runs


def read_config(run: Path) -> DictConfig:
    """The run's config, with ``paths`` pointing at the run folder (resolvable outside Hydra)."""
    cfg = OmegaConf.load(run / CONFIG)
    hydra_file = run / ".hydra" / "hydra.yaml"
    root = None
    if hydra_file.exists():
        root = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.cwd", default=None)
    from ldm.models.diffusion.ddpm import PROJECT_ROOT

    if "paths" in cfg:
        cfg.paths.root_dir = str(root or PROJECT_ROOT)
        cfg.paths.output_dir = str(run.resolve())
    return cfg


def _select(cfg: DictConfig, key: str) -> Any:
    """A value of the run's config, resolved; None when missing or unresolvable."""
    try:
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=True)
    except Exception as exc:  # an interpolation of the run that cannot be resolved here
        log.warning("run config: cannot resolve %s (%s)", key, str(exc).splitlines()[0])
        return None
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def run_label(run: Path, cfg: DictConfig) -> str:
    """``task_name`` plus the run's command-line overrides that change what it learns (what
    tells sweep jobs apart; paths, logging and data-location overrides are left out)."""
    label = str(cfg.get("task_name") or run.name)
    overrides_file = run / ".hydra" / "overrides.yaml"
    if overrides_file.exists():
        overrides = [str(o) for o in OmegaConf.load(overrides_file) or []]
        skip = ("hydra.", "paths.", "prepare.", "callbacks.", "logger", "data.train.concepts.")
        shown = [o for o in overrides if not o.lstrip("+~").startswith(skip)]
        shown = [o for o in shown if "enable_progress_bar" not in o and "toy_eval" not in o]
        if shown:
            label += " " + " ".join(shown)
    return label


def instance_of(cfg: DictConfig, tokens: list[str]) -> tuple[str | None, str | None]:
    """The first concept's instance prompt and image folder, from a concept datamodule
    (``data.train.concepts`` / ``concepts_list``) or a token-phrase one (``data.train.root``
    with ``phrase`` "{} triangle" and ``templates``, as Cross Initialization's)."""
    concepts = _select(cfg, "data.train.concepts") or []
    concepts_list = _select(cfg, "data.train.concepts_list")
    if concepts_list and Path(concepts_list).exists():
        from data.concept import read_concepts_list

        concepts = read_concepts_list(concepts_list)
    if concepts:
        return concepts[0].get("instance_prompt"), concepts[0].get("instance_data_dir")
    phrase = _select(cfg, "data.train.phrase")
    prompt = None
    if phrase and tokens:
        templates = _select(cfg, "data.train.templates") or ["a photo of a {}"]
        prompt = templates[0].format(phrase.format(" ".join(tokens)))
    return prompt, _select(cfg, "data.train.root")


def load_run(path: str | Path, weights: str | Path | None = None) -> RunInfo:
    """Read a run folder: config, weights file, tokens, its first concept and training images."""
    run = Path(path)
    if not is_run(run):
        raise FileNotFoundError(f"{run}: not a run folder (no {CONFIG})")
    cfg = read_config(run)
    if weights is None:
        weights = run / "checkpoints" / "last.safetensors"
        weights = weights if weights.exists() else None
    elif not Path(weights).exists():
        raise FileNotFoundError(f"weights not found: {weights}")
    meta: dict[str, str] = {}
    if weights is not None:
        from ldm.checkpoint import read_metadata

        meta = read_metadata(weights)
    if "tokens" in meta:
        tokens = [str(t) for t in json.loads(meta["tokens"])]
    else:
        tokens = [str(t) for key in ("model.modifier_tokens", "model.placeholder_tokens")
                  for t in (_select(cfg, key) or [])]  # fmt: skip
    prompt, instance_dir = instance_of(cfg, tokens)
    toy = None
    for step in (_select(cfg, "prepare") or {}).values():
        if isinstance(step, dict) and step.get("_target_") == EXPORT_CONCEPT:
            toy = step.get("name")
            break
    return RunInfo(
        dir=run,
        config=cfg,
        weights=Path(weights) if weights is not None else None,
        label=run_label(run, cfg),
        tokens=tokens,
        instance_prompt=prompt,
        instance_dir=Path(instance_dir) if instance_dir else None,
        toy_concept=toy,
        metadata=meta,
    )


def list_images(folder: str | Path) -> list[Path]:
    """A folder's images: the reference layout's ``images.txt`` if its files exist, else every
    image file below the folder (sorted)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"training images folder not found: {folder}")
    listing = folder / "images.txt"
    if listing.exists():
        lines = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        paths = [Path(p) if Path(p).is_absolute() else folder / p for p in lines]
        if paths and all(p.exists() for p in paths):
            return paths
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"{folder}: no images")
    return paths


def build_model(run: RunInfo, device: str = "cpu"):
    """The run's model: its base (the run's model config, with its ``ckpt``) plus its weights.

    A delta (``delta_format`` in the file's metadata) is applied with its base check; any other
    file is loaded as a (partial) state dict.
    """
    from ldm import build_model as build

    model_cfg = _select(run.config, "model")
    if not model_cfg:
        raise ValueError(f"{run.dir}: the run's config has no model")
    model = build(model_cfg)
    if run.weights is None:
        log.warning("%s: no checkpoints/last.safetensors; evaluating the base model", run.dir)
    elif "delta_format" in run.metadata:
        from custom.delta import apply_delta

        apply_delta(model, run.weights)
    else:
        from ldm.checkpoint import load_into, load_state_dict

        load_into(model, load_state_dict(run.weights))
    return model.eval().to(device)
