"""A clip-retrieval backend over your own images: build an index, then serve it on loopback::

    python -m data.retrieval_index build IMAGES INDEX --arch ViT-B-32 --pretrained CKPT_OR_TAG
    python -m data.retrieval_index serve INDEX [--port 1234] [--host 127.0.0.1] [--name local]
    python -m data.retrieve --class_prompt "cat" --num 200 --outpath real_reg/samples_cat

``build`` embeds every image under ``IMAGES`` (recursively, or the ``images.txt`` list of a
reference-layout folder) with an open_clip model, a local checkpoint (``--pretrained
path/to/model.pt``) or a pretrained tag (``--pretrained laion2b_s34b_b79k``, fetched by
open_clip), and writes what ``clip-retrieval back`` reads: ``image.index`` (and ``text.index``
when there are captions), exact inner-product faiss indexes of the L2-normalised embeddings,
``metadata/metadata_0.parquet`` (``url``, ``caption``, ``path``) in index order, and
``index_info.json`` (the model, so ``serve`` needs only the folder). Captions come from a
sidecar ``<name>.txt`` or the ``caption`` of ``<name>.json``; URLs from that json's ``url``,
else ``--url_prefix`` + the relative path (a collection on a web server), else a ``file://``
URI, which :mod:`data.retrieve` reads from disk.

This is what ``clip-retrieval inference`` + ``clip-retrieval index`` compute (the same open_clip
loader, preprocessing and normalisation; a slow test checks the embeddings agree), without their
bugs and weight: the ``files`` input hangs on folders with captions (rom1504/clip-retrieval
#352), and the pipeline starts worker processes and wandb. autofaiss would pick the same exact
Flat index below a few hundred thousand images; for millions, run clip-retrieval's own
inference + index and ``serve INDEX --clip_model open_clip:ARCH/CKPT``.

``serve`` runs clip-retrieval's ``clip_back`` in this process with offline options (no jit,
mclip, aesthetic embeddings or safety models, which download) and binds ``--host`` (default
127.0.0.1): ``clip_back`` hard-codes ``app.run(host="0.0.0.0")``, so ``Flask.run`` is wrapped
to replace the host for the life of the server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import numpy as np

from data.datasets import IMAGE_SUFFIXES, image_problem, open_rgb, read_reference_layout
from data.retrieve import EXTRA_HINT

log = logging.getLogger(__name__)

INFO = "index_info.json"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
OFFLINE_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}


def _sidecar(path: Path) -> tuple[str, str | None]:
    """(caption, url) from ``<name>.txt`` / ``<name>.json`` beside an image."""
    caption, url = "", None
    meta = path.with_suffix(".json")
    if meta.exists():
        try:
            data = json.loads(meta.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta}: not JSON ({err})") from None
        caption, url = data.get("caption") or "", data.get("url")
    if path.with_suffix(".txt").exists():
        caption = path.with_suffix(".txt").read_text()
    return " ".join(caption.split()), url


def collect(root: str | Path, url_prefix: str | None = None) -> list[dict[str, str]]:
    """One ``{"path", "caption", "url"}`` per readable image under ``root``, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    if (root / "images.txt").exists():
        paths, captions = read_reference_layout(root)
        urls = (root / "urls.txt").read_text().splitlines() if (root / "urls.txt").exists() else []
        listed = [(p, c, urls[i] if i < len(urls) else None) for i, (p, c) in
                  enumerate(zip(paths, captions, strict=True))]  # fmt: skip
    else:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        listed = [(p, *_sidecar(p)) for p in files if not p.name.startswith(".")]
    items = []
    for path, caption, url in listed:
        problem = image_problem(path)
        if problem:
            log.warning("skipping %s: %s", path, problem)
            continue
        if not url and url_prefix and path.resolve().is_relative_to(root.resolve()):
            rel = path.resolve().relative_to(root.resolve()).as_posix()
            url = url_prefix.rstrip("/") + "/" + quote(rel)
        items.append({"path": str(path.resolve()), "caption": caption,
                      "url": url or path.resolve().as_uri()})  # fmt: skip
    if not items:
        raise ValueError(f"no readable images under {root}")
    return items


def load_open_clip(arch: str, pretrained: str):
    """(model, preprocess, tokenizer) as clip-retrieval's ``open_clip:ARCH/PRETRAINED`` loads."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
    return model.eval(), preprocess, open_clip.get_tokenizer(arch)


def resolve_pretrained(pretrained: str) -> str:
    """A checkpoint path made absolute (the backend may run elsewhere), or a pretrained tag."""
    path = Path(pretrained).expanduser()
    looks_like_path = path.suffix in (".pt", ".pth", ".bin", ".safetensors") or "/" in pretrained
    if looks_like_path and not path.is_file():
        raise FileNotFoundError(f"CLIP checkpoint not found: {path}")
    return str(path.resolve()) if looks_like_path else pretrained


def _normalised(x) -> np.ndarray:
    x = x.float()
    return (x / x.norm(dim=-1, keepdim=True)).numpy().astype(np.float32)


def embed(items, model, preprocess, tokenizer, batch_size: int = 32):
    """(image embeddings (N, D), caption embeddings (N, D) or None), L2-normalised."""
    import torch

    images, texts = [], []
    captioned = any(it["caption"] for it in items)
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            pixels = torch.stack([preprocess(open_rgb(it["path"])) for it in batch])
            images.append(_normalised(model.encode_image(pixels)))
            if captioned:
                tokens = tokenizer([it["caption"] for it in batch])
                texts.append(_normalised(model.encode_text(tokens)))
            log.info("embedded %d / %d images", start + len(batch), len(items))
    return np.concatenate(images), (np.concatenate(texts) if texts else None)


def write_index(out: str | Path, items: list[dict], image_emb, text_emb, info: dict) -> Path:
    """The folder ``clip-retrieval back`` serves (see the module docstring)."""
    import faiss
    import pandas as pd

    out = Path(out)
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    for name, emb in (("image", image_emb), ("text", text_emb)):
        if emb is None:
            continue
        index = faiss.IndexFlatIP(emb.shape[1])
        index.add(emb)
        faiss.write_index(index, str(out / f"{name}.index"))
    columns = {k: [it[k] for it in items] for k in ("url", "caption", "path")}
    pd.DataFrame(columns).to_parquet(out / "metadata" / "metadata_0.parquet", index=False)
    info = {**info, "count": len(items), "dim": int(image_emb.shape[1]),
            "text_index": text_emb is not None}  # fmt: skip
    (out / INFO).write_text(json.dumps(info, indent=1) + "\n")
    return out


def build(
    images: str | Path,
    out: str | Path,
    arch: str = "ViT-B-32",
    pretrained: str = "",
    url_prefix: str | None = None,
    batch_size: int = 32,
) -> Path:
    """Embed the images under ``images`` and write a servable index folder ``out``."""
    if not pretrained:
        raise ValueError("--pretrained is required: a CLIP checkpoint path or an open_clip tag")
    pretrained = resolve_pretrained(pretrained)
    items = collect(images, url_prefix)
    model, preprocess, tokenizer = load_open_clip(arch, pretrained)
    image_emb, text_emb = embed(items, model, preprocess, tokenizer, batch_size)
    info = {"arch": arch, "pretrained": pretrained, "clip_model": f"open_clip:{arch}/{pretrained}"}
    log.info("index of %d images -> %s", len(items), out)
    return write_index(out, items, image_emb, text_emb, info)


@contextlib.contextmanager
def bound_to(host: str) -> Iterator[None]:
    """Make every ``Flask.run`` inside bind ``host`` (``clip_back`` hard-codes 0.0.0.0)."""
    from flask import Flask

    original = Flask.run

    def run(self, *args, **options):
        options.pop("host", None)
        return original(self, host, *args[1:], **options)

    Flask.run = run
    try:
        yield
    finally:
        Flask.run = original


def serve(
    index: str | Path,
    port: int = 1234,
    host: str = "127.0.0.1",
    name: str = "local",
    clip_model: str | None = None,
    columns: tuple[str, ...] = ("url", "caption"),
) -> None:
    """Serve ``index`` with clip-retrieval's ``clip_back`` until interrupted."""
    index = Path(index).resolve()
    if not (index / "image.index").exists():
        raise FileNotFoundError(f"{index}: no image.index (build one with `build`)")
    if clip_model is None:
        if not (index / INFO).exists():
            raise ValueError(f"{index} has no {INFO}: pass --clip_model open_clip:ARCH/CKPT")
        clip_model = json.loads((index / INFO).read_text())["clip_model"]
    if host not in LOOPBACK:
        log.warning("binding %s: the index and its file paths are reachable from the network", host)
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    from clip_retrieval.clip_back import clip_back

    with tempfile.TemporaryDirectory() as tmp:
        paths = Path(tmp) / "indices_paths.json"
        paths.write_text(json.dumps({name: str(index)}))
        log.info("serving %s as %r on http://%s:%d/knn-service", index, name, host, port)
        with bound_to(host):
            clip_back(
                indices_paths=str(paths), port=port, clip_model=clip_model, use_jit=False,
                enable_mclip_option=False, provide_aesthetic_embeddings=False,
                provide_safety_model=False, provide_violence_detector=False,
                columns_to_return=list(columns), enable_hdf5=False,
            )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data.retrieval_index",
        description="Build or serve a clip-retrieval index of your own images.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="embed a folder of images into a servable index")
    b.add_argument("images")
    b.add_argument("out")
    b.add_argument("--arch", default="ViT-B-32", help="open_clip architecture")
    b.add_argument("--pretrained", required=True, help="checkpoint path or open_clip tag")
    b.add_argument("--url_prefix", default=None, help="base URL the images are served under")
    b.add_argument("--batch_size", type=int, default=32)
    s = sub.add_parser("serve", help="serve an index with clip-retrieval back")
    s.add_argument("index")
    s.add_argument("--port", type=int, default=1234)
    s.add_argument("--host", default="127.0.0.1", help="0.0.0.0 exposes it to the network")
    s.add_argument("--name", default="local", help="the index name clients ask for")
    s.add_argument("--clip_model", default=None, help="for indexes not made by `build`")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.command == "build":
            build(args.images, args.out, args.arch, args.pretrained, args.url_prefix,
                  args.batch_size)  # fmt: skip
        else:
            serve(args.index, args.port, args.host, args.name, args.clip_model)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        print(f"error: {err}; {EXTRA_HINT}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
