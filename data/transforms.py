"""Image transforms of Custom Diffusion's data pipeline (the reference ``MaskBase``).

Every image is centre-cropped to a square and flipped with probability ``flip_p``; target images
then go through :func:`random_rescale`:

* with probability 2/3 a side ``s`` in ``[size // 3, size]``, else in ``[1.2 size, 1.4 size)``,
  rounded up to even;
* ``s < 0.6 size``: the image is shrunk to ``s`` and pasted at a random place on a mid-grey
  canvas (0 in [-1, 1]); the caption gets "a far away " or "very small " in front and the mask
  is 1 on the pasted square only;
* ``s > size``: the image is enlarged to ``s`` and randomly cropped back to ``size``; the caption
  gets "zoomed in " or "close up " in front;
* otherwise: a plain resize.

Masks are image-space here; the model turns them into latent masks
(:func:`custom.model.latent_mask`).
"""

from __future__ import annotations

import random
from typing import NamedTuple

import numpy as np
from PIL import Image

SMALL_PREFIXES = ("a far away ", "very small ")
LARGE_PREFIXES = ("zoomed in ", "close up ")
SMALL_BELOW = 0.6  # sides under this fraction of ``size`` are pasted small


class Sample(NamedTuple):
    image: np.ndarray  # (size, size, 3) float32 in [-1, 1]
    mask: np.ndarray  # (size, size) float32, 1 where the pixels are real image
    caption: str


def center_crop(image: Image.Image) -> Image.Image:
    """The largest centred square."""
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return image.crop((left, top, left + s, top + s))


def to_array(image: Image.Image) -> np.ndarray:
    """(H, W, 3) float32 in [-1, 1]."""
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0


def prepare(image: Image.Image, flip_p: float, rng: random.Random) -> Image.Image:
    """RGB, centre crop, random horizontal flip: applied to target and regularization images."""
    image = center_crop(image.convert("RGB"))
    if rng.random() < flip_p:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image


def plain(image: Image.Image, caption: str, size: int) -> Sample:
    """Resize to ``size``; full mask, caption unchanged (regularization images, ``aug=False``)."""
    array = to_array(image.resize((size, size), Image.BICUBIC))
    return Sample(array, np.ones((size, size), np.float32), caption)


def sample_scale(size: int, rng: random.Random) -> int:
    """The reference's random side: 2/3 in [size//3, size], 1/3 in [1.2 size, 1.4 size)."""
    if rng.randrange(3) < 2:
        s = rng.randint(size // 3, size)
    else:
        s = rng.randint(int(1.2 * size), int(1.4 * size) - 1)
    return s + s % 2


def rescale(image: Image.Image, caption: str, size: int, scale: int, rng: random.Random) -> Sample:
    """Apply the rescale augmentation for side ``scale`` (position and prefix drawn from rng)."""
    if scale < SMALL_BELOW * size:
        half = scale // 2
        cy, cx = rng.randint(half, size - half), rng.randint(half, size - half)
        top, left = cy - half, cx - half
        canvas = np.zeros((size, size, 3), np.float32)  # 0 in [-1, 1]: mid-grey
        canvas[top : top + scale, left : left + scale] = to_array(
            image.resize((scale, scale), Image.BICUBIC)
        )
        mask = np.zeros((size, size), np.float32)
        mask[top : top + scale, left : left + scale] = 1.0
        return Sample(canvas, mask, rng.choice(SMALL_PREFIXES) + caption)
    if scale > size:
        top, left = rng.randint(0, scale - size), rng.randint(0, scale - size)
        big = to_array(image.resize((scale, scale), Image.BICUBIC))
        crop = big[top : top + size, left : left + size]
        return Sample(crop, np.ones((size, size), np.float32), rng.choice(LARGE_PREFIXES) + caption)
    return plain(image, caption, size)


def random_rescale(image: Image.Image, caption: str, size: int, rng: random.Random) -> Sample:
    """The target-image augmentation: :func:`sample_scale` then :func:`rescale`."""
    return rescale(image, caption, size, sample_scale(size, rng), rng)
