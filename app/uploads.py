"""Uploaded files: training images (checked, written in the reference layout) and deltas."""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from app.methods import InputError

MIN_IMAGES, MAX_IMAGES = 3, 20
MAX_BYTES = 20 * 1024 * 1024  # per file
MIN_SIDE = 16


def decode(item: Mapping[str, str]) -> tuple[str, bytes]:
    """``{"name", "data"}`` (data: base64 or a ``data:`` URL) -> (safe name, bytes)."""
    name = Path(str(item.get("name") or "file")).name
    data = str(item.get("data") or "")
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{name}: the upload is corrupt (not base64); try again.") from None
    if len(raw) > MAX_BYTES:
        raise InputError(f"{name}: {len(raw) / 1e6:.0f} MB, larger than {MAX_BYTES // 2**20} MB.")
    return name, raw


def read_image(item: Mapping[str, str]) -> tuple[str, Image.Image]:
    """One uploaded image as RGB; :class:`InputError` ("name (reason)") if it is not usable."""
    name, raw = decode(item)
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            image = im.convert("RGB")
    except UnidentifiedImageError:
        raise InputError(f"{name} (not an image)") from None
    except (OSError, ValueError):
        raise InputError(f"{name} (unreadable or truncated image)") from None
    if min(image.size) < MIN_SIDE:
        raise InputError(f"{name} (only {image.size[0]}x{image.size[1]} pixels)")
    return name, image


def read_images(files: Sequence[Mapping[str, str]]) -> list[tuple[str, Image.Image]]:
    """Decode and check uploaded training images; :class:`InputError` names every bad file."""
    n = len(files)
    if not MIN_IMAGES <= n <= MAX_IMAGES:
        raise InputError(
            f"Upload {MIN_IMAGES} to {MAX_IMAGES} images of your concept (you gave {n})."
            + (" A few photos from different angles work best." if n < MIN_IMAGES else "")
        )
    images, bad = [], []
    for item in files:
        try:
            images.append(read_image(item))
        except InputError as exc:
            bad.append(str(exc))
    if bad:
        raise InputError(
            f"{len(bad)} of {n} files cannot be used: {', '.join(bad)}. "
            "Upload PNG, JPEG or WebP photos."
        )
    return images


def write_images(images: Sequence[tuple[str, Image.Image]], caption: str, out: Path) -> Path:
    """The reference layout (``images/NNN.png``, ``images.txt``, ``caption.txt``) in ``out``."""
    from toyworld.concepts import write_image_folder

    return write_image_folder([im for _, im in images], [caption] * len(images), out)


def save_delta_upload(item: Mapping[str, str], folder: Path) -> Path:
    """Store an uploaded delta (our ``.safetensors`` with delta metadata) in ``folder``."""
    from ldm.checkpoint import read_metadata

    name, raw = decode(item)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).stem) or "delta"
    if not name.endswith(".safetensors"):
        raise InputError(
            f"{name}: upload a delta saved by this project (.safetensors). Other tools' files "
            "(.ckpt, delta.bin, diffusers folders): convert them first with "
            "python -m custom import."
        )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.safetensors"
    i = 1
    while path.exists():
        path, i = folder / f"{stem}_{i}.safetensors", i + 1
    path.write_bytes(raw)
    try:
        meta = read_metadata(path)
    except Exception:  # any parse failure of a foreign file gets the same message
        path.unlink()
        raise InputError(f"{name}: not a readable safetensors file; upload a delta.") from None
    if "delta_format" not in meta or "base_hash" not in meta:
        path.unlink()
        raise InputError(f"{name}: a safetensors file, but not a delta (no delta metadata).")
    return path
