"""Regularization images for a recipe's ``prepare`` step, cached: generated or retrieved.

The reference ``finetune_gen.sh`` samples 200 images with DDIM 50, eta 1, guidance 6 before
training. :func:`generate_class_images` does that once per (base weights, prompt, count,
sampler settings) into ``cache_dir/<key>/`` and writes the run's ``out/images.txt`` +
``out/caption.txt`` (reference layout, pointing into the cache), so a rerun costs nothing.
Hydra builds ``model`` from ``${model}``.

``finetune_real.sh`` retrieves 200 real images with their captions instead;
:func:`retrieve_class_images` does that once per (class prompt, backend) with
:mod:`data.retrieve` and lists them in ``out`` the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from ldm.generate import generate
from ldm.image_io import to_pil
from ldm.util import default_device

log = logging.getLogger(__name__)


def cache_key(model, prompt: str, n: int, **settings: object) -> str:
    """Identity of a generated set: base weights, prompt, count and sampler settings."""
    spec = {"base": model.weights_fingerprint(), "prompt": prompt, "n": n, **settings}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return f"{digest}-n{n}"


def _index_files(folder: Path, paths: list[Path], prompt: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "caption.txt").write_text("\n".join([prompt] * len(paths)) + "\n")
    # images.txt last: its presence marks a complete folder.
    (folder / "images.txt").write_text("\n".join(str(p.resolve()) for p in paths) + "\n")


@torch.no_grad()
def generate_class_images(
    model,
    prompt: str,
    n: int,
    out: str | Path,
    cache_dir: str | Path,
    steps: int = 50,
    eta: float = 1.0,
    guidance_scale: float = 6.0,
    batch_size: int = 10,
    seed: int = 0,
    device: str = "auto",
) -> Path:
    """Sample ``n`` images of ``prompt`` (image i with seed ``seed + i``), cached; returns ``out``.

    ``out`` gets the reference layout (``images.txt`` + ``caption.txt``, every caption
    ``prompt``) for ``ConceptDataset``'s ``class_data_dir``.
    """
    settings = {"steps": steps, "eta": eta, "guidance_scale": guidance_scale, "seed": seed}
    key = cache_key(model, prompt, n, image_size=model.image_size, **settings)
    folder = Path(cache_dir) / key
    paths = [folder / "images" / f"{i:05d}.png" for i in range(n)]
    if (folder / "images.txt").exists() and all(p.exists() for p in paths):
        log.info("class images for %r: cached in %s", prompt, folder)
    else:
        log.info("generating %d class images for %r into %s", n, prompt, folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder.parent))
        (tmp / "images").mkdir()
        dev = default_device() if device == "auto" else torch.device(device)
        model = model.eval().to(dev)
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            batch = generate(
                model,
                [prompt] * b,
                sampler="ddim",
                steps=steps,
                eta=eta,
                guidance_scale=guidance_scale,
                seed=seed + start,
                progress=False,
            )
            for i, image in enumerate(to_pil(batch)):
                image.save(tmp / "images" / f"{start + i:05d}.png")
        _index_files(
            tmp, [folder / "images" / p.name for p in sorted(tmp.glob("images/*"))], prompt
        )
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    _index_files(Path(out), paths, prompt)
    return Path(out)


def retrieve_class_images(
    class_prompt: str,
    n: int,
    out: str | Path,
    cache_dir: str | Path,
    backend_url: str | None = None,
    indice_name: str | None = None,
    aesthetic_score: int | None = 9,
    aesthetic_weight: float | None = 0.1,
    deduplicate: bool = True,
    **options: object,
) -> Path:
    """``n`` real images of ``class_prompt`` from a clip-retrieval backend, cached; returns out.

    They are retrieved into ``cache_dir/<prompt>-<backend key>/`` when that folder holds fewer
    than ``n`` (the backend is not contacted otherwise); ``out`` then lists the first ``n`` with
    their own captions. ``options`` go to :func:`data.retrieve.retrieve` (``timeout``,
    ``retries``, ``max_bytes``, ``min_side``, ``workers``).
    """
    from data.retrieve import ALTERNATIVES, KnnClient, RetrievalError, retrieve

    client = KnnClient(backend_url or KnnClient.url, indice_name, aesthetic_score,
                       aesthetic_weight, deduplicate=deduplicate)  # fmt: skip
    backend = hashlib.sha256(json.dumps([client.url, indice_name]).encode()).hexdigest()[:8]
    slug = re.sub(r"[^A-Za-z0-9]+", "_", class_prompt).strip("_") or "class"
    folder = Path(cache_dir) / f"{slug}-{backend}"
    rows = retrieve(class_prompt, n, folder, client, progress=False, **options)[:n]
    if not rows:
        raise RetrievalError(f"no images for {class_prompt!r} from {client.url}; {ALTERNATIVES}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "caption.txt").write_text("".join(f"{r.caption}\n" for r in rows))
    (out / "urls.txt").write_text("".join(f"{r.url}\n" for r in rows))
    (out / "images.txt").write_text("".join(f"{r.path}\n" for r in rows))
    log.info("%d retrieved class images for %r listed in %s", len(rows), class_prompt, out)
    return out
