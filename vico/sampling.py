"""``sample.py``'s ViCo block: ``vico.ckpt=... vico.image=ref.png prompt="a * on the beach"``.

``vico.ckpt`` is our ``.safetensors`` or the reference's checkpoint (a folder with
``embeddings_gs-N.pt`` / ``cross_attention-N.pt``, or either file; ``vico.step`` picks N, else the
highest). The model is built as a ``ViCo`` with the checkpoint's settings, its token row and image
blocks are copied in, and every batch is sampled with the reference image as the visual condition
of both classifier-free-guidance halves.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vico.formats import apply_vico, model_overrides, read_vico

log = logging.getLogger(__name__)


@dataclass
class ViCoCheckpoint:
    path: Path
    tensors: dict[str, Tensor]
    meta: dict[str, str]


def read_config(cfg: Mapping[str, Any] | None) -> ViCoCheckpoint | None:
    """The checkpoint of a ``vico`` config block, or None when it names none."""
    cfg = cfg or {}
    if not cfg.get("ckpt"):
        if cfg.get("image"):
            raise ValueError("vico.image needs vico.ckpt (a trained ViCo token and image blocks)")
        return None
    if not cfg.get("image"):
        raise ValueError("vico.ckpt needs vico.image: a reference image of the concept")
    path = Path(cfg["ckpt"])
    if not path.exists():
        raise FileNotFoundError(f"vico.ckpt not found: {path}")
    image = Path(cfg["image"])
    if not image.is_file():
        raise FileNotFoundError(f"vico.image not found: {image}")
    tensors, meta = read_vico(path, cfg.get("step"))
    return ViCoCheckpoint(path, tensors, meta)


def model_config(model_cfg: dict[str, Any], ckpt: ViCoCheckpoint | None) -> dict[str, Any]:
    """``model_cfg`` as a ``ViCo`` that fits the checkpoint (unchanged without one)."""
    return model_cfg if ckpt is None else {**model_cfg, **model_overrides(ckpt.meta)}


def attach(model: nn.Module, ckpt: ViCoCheckpoint | None) -> None:
    """Copy the checkpoint into the model; a different base is reported, not refused."""
    if ckpt is None:
        return
    want = ckpt.meta.get("base_hash")
    found = model.weights_fingerprint(exclude=set(model.vico_parameters()))
    if want and want != found:
        log.warning("%s was trained on base %s, this base is %s", ckpt.path, want, found)
    apply_vico(model, ckpt.tensors, str(ckpt.path))


@contextlib.contextmanager
def condition(
    model: nn.Module, cfg: Mapping[str, Any] | None, prompts: Sequence[str], seed: int = 0
) -> Iterator[None]:
    """The visual condition of ``cfg.image`` for ``prompts`` (nothing without a ViCo block)."""
    if not (cfg or {}).get("image"):
        yield
        return
    generator = torch.Generator(device=model.device).manual_seed(int(seed))
    with model.visual_condition(cfg["image"], prompts, generator):
        yield
