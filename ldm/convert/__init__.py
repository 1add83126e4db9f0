"""Convert SD v1 weights between the CompVis layout and a diffusers pipeline folder.

Key maps are generated from the CompVis model config (``unet_config.params``,
``first_stage_config.params.ddconfig``), so any size works, not just SD's. Tensors are renamed,
never copied; only the VAE mid-block attention changes shape (1x1 conv <-> linear, as views).
diffusers itself is not imported (the tests use it as an independent reference).

Modules: :mod:`~ldm.convert.configs` (model configs <-> diffusers configs, DDPM buffers),
:mod:`~ldm.convert.keys` (key maps, state-dict conversions), :mod:`~ldm.convert.folders`
(diffusers folders on disk), ``__main__`` (the CLI). Every public name is re-exported here.

CLI::

    python -m ldm.convert --to diffusers SRC.(ckpt|safetensors) OUT_DIR [--config sd15|PATH]
    python -m ldm.convert --to compvis SRC_DIR OUT.(safetensors|ckpt)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ldm.convert.configs import (
    DIFFUSERS_VERSION,
    SCHEDULES,
    SD_SCALE_FACTOR,
    SD_TEXT_CONFIG,
    TEXT_ARCH_KEYS,
    diffusers_configs,
    model_config_from_diffusers,
    normalize_model_config,
    scheduler_config,
    text_encoder_config,
    unet_diffusers_config,
    vae_diffusers_config,
)
from ldm.convert.folders import MODEL_INDEX, TOKENIZER_DIR, read_diffusers, write_diffusers
from ldm.convert.keys import (
    EMA_PREFIX,
    TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    Pairs,
    Tensors,
    compvis_to_diffusers,
    diffusers_to_compvis,
    text_compvis_to_diffusers,
    text_diffusers_to_compvis,
    unet_compvis_to_diffusers,
    unet_diffusers_to_compvis,
    unet_key_pairs,
    vae_compvis_to_diffusers,
    vae_diffusers_to_compvis,
    vae_key_pairs,
)
from ldm.modules.diffusionmodules.schedule import DDPM_BUFFERS, ddpm_schedule_buffers

if TYPE_CHECKING:
    from ldm.convert.__main__ import main

__all__ = [
    "DDPM_BUFFERS",
    "DIFFUSERS_VERSION",
    "EMA_PREFIX",
    "MODEL_INDEX",
    "SCHEDULES",
    "SD_SCALE_FACTOR",
    "SD_TEXT_CONFIG",
    "TEXT_ARCH_KEYS",
    "TEXT_PREFIX",
    "TOKENIZER_DIR",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "Pairs",
    "Tensors",
    "compvis_to_diffusers",
    "ddpm_schedule_buffers",
    "diffusers_configs",
    "diffusers_to_compvis",
    "main",
    "model_config_from_diffusers",
    "normalize_model_config",
    "read_diffusers",
    "scheduler_config",
    "text_compvis_to_diffusers",
    "text_diffusers_to_compvis",
    "text_encoder_config",
    "unet_compvis_to_diffusers",
    "unet_diffusers_config",
    "unet_diffusers_to_compvis",
    "unet_key_pairs",
    "vae_compvis_to_diffusers",
    "vae_diffusers_config",
    "vae_diffusers_to_compvis",
    "vae_key_pairs",
    "write_diffusers",
]


def __getattr__(name: str) -> Any:
    """``main`` lives in ``__main__`` and is imported on first use: importing it here eagerly
    would make ``python -m ldm.convert`` warn that the module was imported before it ran."""
    if name == "main":
        from ldm.convert.__main__ import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
