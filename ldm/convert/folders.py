"""Writing and reading diffusers ``StableDiffusionPipeline`` folders of SD v1 weights.

A folder holds ``unet`` / ``vae`` / ``text_encoder`` weights and configs, the scheduler config,
``model_index.json`` and the CLIP tokenizer; it is written atomically (built under a temporary
sibling name, then renamed) and read back into one CompVis state dict plus our model config.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoint import load_state_dict, save_state_dict
from ldm.convert.configs import (
    DIFFUSERS_VERSION,
    SD_SCALE_FACTOR,
    diffusers_configs,
    model_config_from_diffusers,
    normalize_model_config,
)
from ldm.convert.keys import Tensors, compvis_to_diffusers, diffusers_to_compvis

log = logging.getLogger("ldm.convert")  # the package's logger name, as before the split

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "clip_tokenizer"
_WEIGHTS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _scale_factor(sd: Tensors, cfg: Mapping[str, Any]) -> float:
    """The latent scale: a ``scale_factor`` buffer in the weights wins over the config's."""
    value = float(sd["scale_factor"]) if "scale_factor" in sd else cfg.get("scale_factor")
    if value is None or math.isnan(value):
        raise ValueError("scale_factor is unknown (null in the config, unset in the weights)")
    return float(value)


def _write_json(path: Path, obj: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _nonempty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def write_diffusers(
    sd: Tensors,
    model_config: Any,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    use_ema: bool = False,
) -> Path:
    """Write a CompVis state dict as a diffusers ``StableDiffusionPipeline`` folder.

    The folder is built under a temporary sibling name and renamed into place at the end; an
    existing non-empty ``out_dir`` is an error unless ``overwrite``."""
    out = Path(out_dir)
    if _nonempty(out) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (use --overwrite to replace it)")
    cfg = normalize_model_config(model_config)
    configs = diffusers_configs(cfg, _scale_factor(sd, cfg))
    parts = compvis_to_diffusers(sd, cfg, use_ema=use_ema)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, weights in parts.items():
            save_state_dict(weights, tmp / name / f"{_WEIGHTS[name]}.safetensors")
            _write_json(tmp / name / "config.json", configs[name])
        _write_json(tmp / "scheduler" / "scheduler_config.json", configs["scheduler"])
        _write_json(tmp / "model_index.json", MODEL_INDEX)
        if TOKENIZER_DIR.is_dir():
            shutil.copytree(TOKENIZER_DIR, tmp / "tokenizer")
        else:
            log.warning("no tokenizer in %s: tokenizer/ not written", TOKENIZER_DIR)
        tmp.chmod(0o755)
        old = out.with_name(f".{out.name}.old") if out.exists() else None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)  # left over from an interrupted run
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _load_part(folder: Path, stem: str) -> dict[str, torch.Tensor]:
    """``stem.safetensors`` / ``stem.bin`` of a component folder, or their sharded index."""
    for ext in ("safetensors", "bin"):
        if (folder / f"{stem}.{ext}").exists():
            return load_state_dict(folder / f"{stem}.{ext}")
        index = folder / f"{stem}.{ext}.index.json"
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for s in shards for k, v in load_state_dict(folder / s).items()}
    raise FileNotFoundError(f"no {stem}.safetensors or {stem}.bin in {folder}")


def read_diffusers(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A diffusers SD folder -> (CompVis state dict, model config derived from its configs)."""
    root = Path(path)
    configs: dict[str, Any] = {}
    for name in (*_WEIGHTS, "scheduler"):
        file = root / name / ("scheduler_config.json" if name == "scheduler" else "config.json")
        if not file.exists() and name != "scheduler":
            raise FileNotFoundError(f"{root} is not a diffusers SD folder: {file} is missing")
        configs[name] = json.loads(file.read_text()) if file.exists() else None
    cfg = model_config_from_diffusers(
        configs["unet"], configs["vae"], configs["text_encoder"], configs["scheduler"]
    )
    parts = {name: _load_part(root / name, stem) for name, stem in _WEIGHTS.items()}
    scale = configs["vae"].get("scaling_factor", SD_SCALE_FACTOR)
    return diffusers_to_compvis(parts, cfg, scale_factor=scale), cfg
