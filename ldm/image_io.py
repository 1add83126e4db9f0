"""Image tensors <-> PIL and a dependency-free image grid."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) floats in [0, 1] -> PIL images."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]


def from_pil(images: Sequence[Image.Image], size: int | None = None) -> Tensor:
    """PIL images -> (B, 3, H, W) in [-1, 1] (resized to ``size`` if given)."""
    out = []
    for im in images:
        im = im.convert("RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        out.append(
            torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        )
    return torch.stack(out)


def make_grid(images: Sequence[Image.Image], ncols: int | None = None, pad: int = 2) -> Image.Image:
    """Tile equally sized images into one grid with a white border."""
    n = len(images)
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    w, h = images[0].size
    grid = Image.new("RGB", (ncols * (w + pad) + pad, nrows * (h + pad) + pad), "white")
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        grid.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def save_images(images: Sequence[Image.Image], outdir: Path, stem: str) -> list[Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        path = outdir / f"{stem}_{i:04d}.png"
        im.save(path)
        paths.append(path)
    return paths
