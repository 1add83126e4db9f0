"""Learned token embeddings as files, and onto a model.

Written by :class:`SaveEmbeddings` (every ``every_n_steps`` and at the end of training):

``learned_embeds[-steps-N].bin``          the reference's file: ``torch.save({token: (D,)})``
``learned_embeds[-steps-N].safetensors``  the same dict as safetensors (tokens in the header)
``textual_inversion/<i>_<token>.safetensors``  at the end: one ``{token: (D,)}`` file per token,
                                          what diffusers' ``load_textual_inversion`` reads::

    pipe.load_textual_inversion(sorted(glob("run/embeddings/textual_inversion/*.safetensors")))

:func:`load_embeddings` reads any of these (a file or a folder), a single-token file of another
tool, or a delta of ours (``last.safetensors``); :func:`apply_embeddings` adds the tokens to a
model (``sample.py embeddings=PATH``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from ldm.checkpoint import (
    load_pickle,
    load_state_dict,
    read_metadata,
    save_pickle,
    save_state_dict,
)
from ldm.modules.tokens import PLACEHOLDER_PARAM, add_placeholder_tokens, placeholder_embedding

log = logging.getLogger(__name__)

STEM = "learned_embeds"
TI_DIR = "textual_inversion"
ROWS_SUFFIX = f"token_embedding.{PLACEHOLDER_PARAM}"


def token_rows(embedder: nn.Module) -> dict[str, Tensor]:
    """``{token: (D,)}`` of every placeholder token of ``embedder``, in row order."""
    emb = placeholder_embedding(embedder)
    if emb is None:
        return {}
    rows = emb.placeholder_weight.detach().float().cpu()
    return {t: rows[i].clone() for i, t in enumerate(emb.tokens)}


def _file_safe(token: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", token).strip("_") or "token"


def save_embeddings(
    rows: Mapping[str, Tensor], folder: str | Path, step: int | None = None, diffusers: bool = True
) -> list[Path]:
    """Write ``rows`` ({token: (D,)}) into ``folder``; returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = {t: v.detach().float().cpu().reshape(-1).contiguous() for t, v in rows.items()}
    stem = STEM if step is None else f"{STEM}-steps-{step}"
    paths = [folder / f"{stem}.bin", folder / f"{stem}.safetensors"]
    save_pickle(rows, paths[0])
    save_state_dict(rows, paths[1], metadata={"tokens": json.dumps(list(rows))})
    if diffusers:
        for i, (token, vector) in enumerate(rows.items()):
            path = folder / TI_DIR / f"{i}_{_file_safe(token)}.safetensors"
            save_state_dict({token: vector}, path)
            paths.append(path)
    return paths


def _as_rows(obj: Mapping, where: str) -> dict[str, Tensor]:
    rows = {}
    for token, value in obj.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"{where}: {token!r} is not a tensor")
        if value.dim() > 1 and value.shape[0] != 1:
            raise ValueError(f"{where}: {token!r} has {value.shape[0]} vectors; one per token")
        rows[str(token)] = value.reshape(-1).float()
    if not rows:
        raise ValueError(f"{where}: no embeddings in the file")
    return rows


def _load_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        meta = read_metadata(path)
        tensors = load_state_dict(path)
        if "delta_format" in meta:  # one of our deltas: the token rows under their model key
            tokens = json.loads(meta.get("tokens", "[]"))
            key = next((k for k in tensors if k.endswith(ROWS_SUFFIX)), None)
            if key is None or not tokens:
                raise ValueError(f"{path}: a delta without token embeddings")
            return dict(zip(tokens, tensors[key].float(), strict=True))
        return _as_rows(tensors, str(path))
    obj = load_pickle(path)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a {{token: vector}} dict, found {type(obj).__name__}")
    return _as_rows(obj, str(path))


def load_embeddings(path: str | Path) -> dict[str, Tensor]:
    """``{token: (D,)}`` from a file, or from a folder (its ``learned_embeds`` file, else its
    single-token files, else those of its ``textual_inversion/``)."""
    from custom.formats import read_token_files

    path = Path(path)
    if path.is_file():
        return _load_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"embeddings not found: {path}")
    for name in (f"{STEM}.safetensors", f"{STEM}.bin"):
        if (path / name).is_file():
            return _load_file(path / name)
    for folder in (path, path / TI_DIR):
        rows = read_token_files(folder) if folder.is_dir() else {}
        if rows:
            return {t: v.float() for t, v in rows.items()}
    raise FileNotFoundError(f"{path}: no {STEM} file and no single-token embedding files")


def apply_embeddings(model: nn.Module, source: str | Path | Mapping[str, Tensor]) -> list[str]:
    """Give ``model``'s text encoder the tokens of ``source`` (added if new, replaced if the
    model already has them, e.g. from a delta); returns the tokens."""
    rows = dict(source) if isinstance(source, Mapping) else load_embeddings(source)
    embedder = model.cond_stage_model
    dim = embedder.token_embedding.embedding_dim
    bad = {t: v.numel() for t, v in rows.items() if v.numel() != dim}
    if bad:
        raise ValueError(
            f"embeddings of size {sorted(set(bad.values()))} but this text encoder's is {dim}: "
            "they were trained on another base"
        )
    emb = placeholder_embedding(embedder)
    have = set(emb.tokens) if emb is not None else set()
    new = [t for t in rows if t not in have]
    if new:
        add_placeholder_tokens(embedder, new)
    emb = placeholder_embedding(embedder)
    replaced = [t for t in rows if t in have]
    if replaced:
        log.info("replacing the rows of tokens the model already has: %s", replaced)
    with torch.no_grad():
        for token, vector in rows.items():
            emb.placeholder_weight[emb.tokens.index(token)] = vector.to(emb.placeholder_weight)
    log.info("embeddings for %s", list(rows))
    return list(rows)


class SaveEmbeddings(pl.Callback):
    """Writes the model's placeholder-token embeddings (see the module docstring) to ``dirpath``
    every ``every_n_steps`` (the reference: 100) and at the end, with the diffusers files."""

    def __init__(self, dirpath: str, every_n_steps: int = 100, diffusers: bool = True) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.diffusers = diffusers

    def _save(self, pl_module: pl.LightningModule, step: int | None) -> None:
        if pl_module.trainer.global_rank != 0:
            return
        rows = token_rows(pl_module.cond_stage_model)
        if not rows:
            log.warning("no placeholder tokens: no embeddings saved")
            return
        paths = save_embeddings(rows, self.dirpath, step, self.diffusers and step is None)
        log.info("saved embeddings %s", paths[0])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            self._save(pl_module, step)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(pl_module, None)
