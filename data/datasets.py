"""Captioned image folders.

Two layouts are read: the reference one (``images.txt`` with one image path per line beside
``caption.txt`` with one caption per line, as Custom Diffusion's retrieval writes), and a plain
folder of images with an optional same-named ``.txt`` caption each (or one ``caption`` for all).
Items are ``{"image": (H, W, 3) float in [-1, 1], "caption": str}``, the CompVis convention.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def center_square(image: Image.Image, size: int) -> Image.Image:
    """Centre crop to a square, then resize to ``size``."""
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return image.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)


def to_tensor_hwc(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)


def read_reference_layout(root: Path) -> tuple[list[Path], list[str]]:
    """``images.txt`` + ``caption.txt`` -> (paths, captions); relative paths are under ``root``."""
    lines = (root / "images.txt").read_text().splitlines()
    captions = (root / "caption.txt").read_text().splitlines()
    paths = [Path(p) if Path(p).is_absolute() else root / p for p in lines if p.strip()]
    if len(captions) < len(paths):
        raise ValueError(f"{root}: {len(paths)} images but only {len(captions)} captions")
    return paths, [c.strip() for c in captions[: len(paths)]]


def is_readable_image(path: Path) -> bool:
    """A decodable image file; unreadable ones are logged and skipped, never fatal."""
    try:
        with Image.open(path) as im:
            im.verify()
    except (OSError, UnidentifiedImageError) as err:
        log.warning("skipping unreadable image %s (%s)", path, err)
        return False
    return True


def scan_folder(root: Path, caption: str | None) -> tuple[list[Path], list[str]]:
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    paths = [p for p in paths if is_readable_image(p)]
    captions = []
    for p in paths:
        side = p.with_suffix(".txt")
        if caption is None and not side.exists():
            raise ValueError(f"{p} has no caption: add {side.name} or set a caption for the folder")
        captions.append(caption if caption is not None else side.read_text().strip())
    return paths, captions


class CaptionedImages(Dataset):
    """Images with captions from a folder (either layout), centre-cropped to ``size``.

    Args:
        caption: one caption for every image (e.g. "a photo of a dog"); overrides sidecars.
        repeat: virtual length multiplier, for tiny folders.
        flip_p: probability of a horizontal flip.
    """

    def __init__(
        self,
        root: str | Path,
        size: int = 512,
        caption: str | None = None,
        repeat: int = 1,
        flip_p: float = 0.5,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        if (self.root / "images.txt").exists():
            paths, captions = read_reference_layout(self.root)
            if caption is not None:
                captions = [caption] * len(paths)
        else:
            paths, captions = scan_folder(self.root, caption)
        self.items = [(p, c) for p, c in zip(paths, captions, strict=True) if is_readable_image(p)]
        if not self.items:
            raise ValueError(f"no readable images in {self.root}")
        self.size = size
        self.repeat = repeat
        self.flip_p = flip_p

    def __len__(self) -> int:
        return len(self.items) * self.repeat

    def __getitem__(self, i: int) -> dict:
        path, caption = self.items[i % len(self.items)]
        with Image.open(path) as im:
            image = center_square(im.convert("RGB"), self.size)
        if random.random() < self.flip_p:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return {"image": to_tensor_hwc(image), "caption": caption}
