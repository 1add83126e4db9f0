"""The project's CompVis-compatible Stable Diffusion v1 core.

``load_model(ckpt, config="sd15")`` builds a :class:`LatentDiffusion` from a model config (a name in
``configs/model/`` or a YAML path, in our form or the original ``v1-inference.yaml`` form), loads a
``.ckpt`` / ``.safetensors`` / diffusers folder into it without executing code, and returns it in
eval mode.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"


def _load_yaml(path: Path):
    """A model YAML; a Hydra ``defaults: [name, _self_]`` list (another config of
    ``configs/model/`` under this one, as ``toy64`` extends ``toy``) is merged the same way."""
    cfg = OmegaConf.load(path)
    bases = cfg.pop("defaults", None) or []
    if any(not isinstance(b, str) for b in bases) or "_self_" in bases[:-1]:
        raise ValueError(f"{path}: defaults may only list model configs, then _self_")
    parents = [_load_yaml(CONFIG_DIR / f"{b}.yaml") for b in bases if b != "_self_"]
    return OmegaConf.merge(*parents, cfg)


def resolve_model_config(config: str | Path | dict) -> dict[str, Any]:
    """A config name (``sd15``, ``tiny``, ``toy``, ``toy64``), a YAML path or a mapping -> flat
    dict."""
    from ldm.convert import normalize_model_config

    if isinstance(config, str | Path):
        path = Path(config)
        if not path.suffix:
            path = CONFIG_DIR / f"{config}.yaml"
            if not path.exists():
                names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
                raise FileNotFoundError(f"no model config named {config!r}; known: {names}")
        elif not path.exists():
            raise FileNotFoundError(f"model config not found: {path}")
        config = OmegaConf.to_container(_load_yaml(path), resolve=True)
    elif not isinstance(config, dict):
        config = OmegaConf.to_container(config, resolve=True)
    return normalize_model_config(config)


def build_model(config: str | Path | dict = "sd15", **overrides: Any):
    """Instantiate a model from its config (random weights unless it names a ``ckpt``)."""
    from ldm.util import get_obj_from_str

    cfg = dict(resolve_model_config(config))
    cfg.update(overrides)
    cls = get_obj_from_str(cfg.pop("_target_"))
    return cls(**cfg)


def load_model(
    ckpt_path: str | Path | None = None,
    config: str | Path | dict = "sd15",
    device: str | torch.device = "cpu",
    strict: bool = False,
):
    """Build the model of ``config`` and load ``ckpt_path`` into it; returns it in eval mode.

    Without ``ckpt_path`` the config's own ``ckpt`` (e.g. the shipped toy base) is loaded.
    """
    from ldm.checkpoint import load_into, load_state_dict

    if ckpt_path is None:
        model = build_model(config)
        if not resolve_model_config(config).get("ckpt"):
            log.warning("no checkpoint given: the model has random weights")
        return model.eval().to(device)
    model = build_model(config, ckpt=None)
    load_into(model, load_state_dict(ckpt_path), strict=strict)
    return model.eval().to(device)


__all__ = ["build_model", "load_model", "resolve_model_config"]
