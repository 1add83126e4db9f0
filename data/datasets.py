"""Captioned image folders.

Two layouts are read: the reference one (``images.txt`` with one image path per line beside
``caption.txt`` with one caption per line, as Custom Diffusion's retrieval writes), and a plain
folder of images with an optional same-named ``.txt`` caption each (or one ``caption`` for all).
Items are ``{"image": (H, W, 3) float in [-1, 1], "caption": str}``, the CompVis convention.

Bad files never stop a run: every image is decoded once when a folder is read, and one that is
not an image, corrupt, truncated, too large for PIL's decompression-bomb limit or smaller than
:data:`MIN_SIDE` is skipped with one logged line. :func:`open_rgb` reads the rest as 8-bit RGB
the same way everywhere: the EXIF orientation applied, CMYK converted, 16-bit greyscale scaled
(not clipped), and transparency composited onto white.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
MIN_SIDE = 16  # pixels: smaller images carry nothing to learn from
# Sidecar and layout files that sit beside images and are not reported as ignored.
TEXT_FILES = {".txt", ".json", ".csv"}


def center_square(image: Image.Image, size: int) -> Image.Image:
    """Centre crop to a square, then resize to ``size``."""
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return image.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB, EXIF orientation applied (see the module docstring)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        high = 65535.0 if image.mode.startswith("I;16") or np.asarray(image).max() > 255 else 255.0
        grey = np.asarray(image, dtype=np.float64) * (255.0 / high)
        image = Image.fromarray(grey.round().clip(0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray((np.asarray(image).clip(0, 1) * 255).round().astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def open_rgb(path: str | Path) -> Image.Image:
    """The image at ``path`` as 8-bit RGB (:func:`to_rgb`), fully decoded."""
    with Image.open(path) as im:
        return to_rgb(im)


def to_tensor_hwc(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)


def resolve_listed(root: Path, line: str) -> Path:
    """The file an ``images.txt`` line names: absolute, under ``root``, relative to the working
    directory (the original retrieval scripts write ``<outpath>/images/0.jpg``), or, for a moved
    folder, ``root/<its folder>/<name>``; the first that exists (else ``root/line``)."""
    path = Path(line.strip())
    if path.is_absolute() and path.exists():
        return path
    candidates = [root / path, path, root / path.parent.name / path.name]
    return next((p for p in candidates if p.exists()), candidates[0])


def read_reference_layout(root: Path) -> tuple[list[Path], list[str]]:
    """``images.txt`` + ``caption.txt`` -> (paths, captions), paths by :func:`resolve_listed`."""
    lines = (root / "images.txt").read_text().splitlines()
    captions = (root / "caption.txt").read_text().splitlines()
    paths = [resolve_listed(root, p) for p in lines if p.strip()]
    if len(captions) < len(paths):
        raise ValueError(f"{root}: {len(paths)} images but only {len(captions)} captions")
    return paths, [c.strip() for c in captions[: len(paths)]]


def image_problem(path: Path) -> str | None:
    """Why the file at ``path`` cannot be trained on, or None if it can."""
    try:
        with Image.open(path) as im:
            im.load()  # a full decode: verify() passes truncated JPEGs
            w, h = im.size
    except Image.DecompressionBombError as err:
        return f"too large ({err})".split(". ")[0]
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, SyntaxError, ValueError) as err:  # PIL raises all three on broken files
        lines = str(err).strip().splitlines()
        return f"unreadable ({lines[0] if lines else type(err).__name__})"
    if min(w, h) < MIN_SIDE:
        return f"too small ({w}x{h}, under {MIN_SIDE} px)"
    return None


def is_readable_image(path: Path) -> bool:
    """A decodable image file; others are logged (one line) and skipped, never fatal."""
    problem = image_problem(path)
    if problem is not None:
        log.warning("skipping %s: %s", path, problem)
    return problem is None


def scan_folder(root: Path, caption: str | None) -> tuple[list[Path], list[str]]:
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    ignored = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES | TEXT_FILES]
    if ignored:
        shown = ", ".join(ignored[:3]) + (", ..." if len(ignored) > 3 else "")
        log.info("%s: ignoring %d files that are not images (%s)", root, len(ignored), shown)
    paths = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and is_readable_image(p)]
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
            listed = zip(paths, captions, strict=True)
            self.items = [(p, c) for p, c in listed if is_readable_image(p)]
        else:
            self.items = list(zip(*scan_folder(self.root, caption), strict=True))
        if not self.items:
            raise ValueError(
                f"no readable images in {self.root} (image files: "
                f"{', '.join(sorted(IMAGE_SUFFIXES))}; unreadable ones are logged above)"
            )
        self.size = size
        self.repeat = repeat
        self.flip_p = flip_p

    def __len__(self) -> int:
        return len(self.items) * self.repeat

    def __getitem__(self, i: int) -> dict:
        path, caption = self.items[i % len(self.items)]
        image = center_square(open_rgb(path), self.size)
        if random.random() < self.flip_p:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return {"image": to_tensor_hwc(image), "caption": caption}
