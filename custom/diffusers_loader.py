"""Load a Custom Diffusion export into a diffusers ``StableDiffusionPipeline``.

diffusers' documented path (``unet.load_attn_procs`` + ``load_textual_inversion``) silently
leaves the base UNet in place in current releases unless the private ``_pipeline=`` argument
is passed, and fails on the ``.safetensors`` weights even then (diffusers issue #9320). This
loader does not depend on it: the fine-tuned matrices are written straight into the UNet's
``attn2.to_k`` / ``to_v`` (and ``to_q`` / ``to_out`` for ``crossattn``) weights -- at inference
the custom processor only computes the same attention with them -- and each token is added to
the tokenizer with its row in the text encoder's embedding table. Works on any diffusers
version; it imports neither diffusers nor transformers::

    pipe = StableDiffusionPipeline.from_pretrained(BASE)
    load_custom_diffusion(pipe, "exported_folder")     # python -m custom export --format diffusers
    pipe("a photo of a <new1> dog")
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from custom.formats import PROCESSOR_PARAMS, read_diffusers_weights, read_token_files

log = logging.getLogger(__name__)


def _set_unet_weights(unet: Any, entries: dict[str, Any]) -> int:
    modules = dict(unet.named_modules())
    params = [(k, v) for k, v in entries.items() if isinstance(v, Tensor)]
    if not params:
        raise ValueError("no custom diffusion weights in the file")
    todo = []
    for key, value in params:
        module_name, _, param = key.partition(".processor.")
        target = PROCESSOR_PARAMS.get(param)
        module = modules.get(module_name)
        if target is None or module is None:
            raise ValueError(f"{key}: no such attention parameter in this UNet")
        owner_name, _, leaf = target.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        current = getattr(owner, leaf)
        if current.shape != value.shape:
            raise ValueError(f"{key}: shape {tuple(value.shape)}, UNet has {tuple(current.shape)}")
        todo.append((current, value))
    with torch.no_grad():
        for current, value in todo:
            current.copy_(value.to(device=current.device, dtype=current.dtype))
    return len(todo)


def add_tokens(pipe: Any, rows: dict[str, Tensor]) -> list[int]:
    """Add ``{token: row}`` to the pipeline's tokenizer and text encoder; returns the ids."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    clash = [t for t in rows if t in tokenizer.get_vocab()]
    if clash:
        raise ValueError(f"tokens {clash} already exist in the pipeline's tokenizer")
    tokenizer.add_tokens(list(rows))
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = encoder.get_input_embeddings().weight
    ids = tokenizer.convert_tokens_to_ids(list(rows))
    with torch.no_grad():
        for i, row in zip(ids, rows.values(), strict=True):
            table[i] = row.to(device=table.device, dtype=table.dtype)
    return ids


def load_custom_diffusion(pipe: Any, path: str | Path) -> list[str]:
    """Put an exported delta (folder, or its weights file beside the token files) into ``pipe``.

    Returns the tokens added. Raises ``ValueError`` / ``FileNotFoundError`` (one line) when the
    weights do not fit the pipeline's UNet or a token already exists; nothing is changed then.
    """
    entries, meta, folder = read_diffusers_weights(path)
    order = json.loads(meta["tokens"]) if "tokens" in meta else None
    rows = read_token_files(folder, order)
    clash = [t for t in rows if t in pipe.tokenizer.get_vocab()]
    if clash:
        raise ValueError(f"tokens {clash} already exist in the pipeline's tokenizer")
    n = _set_unet_weights(pipe.unet, entries)
    add_tokens(pipe, rows)
    log.info("loaded %d custom diffusion weights and tokens %s from %s", n, list(rows), path)
    return list(rows)
