"""ViCo checkpoints: ours (``.safetensors``) and the reference's ``.pt`` pair, both ways.

Ours is :meth:`ViCo.export_state_dict` with :meth:`ViCo.export_metadata`: the token row
``cond_stage_model.transformer.text_model.embeddings.token_embedding.placeholder_weight`` (1, D)
and ``image_cross_attention.<layer with _>.<param>``, plus ``placeholder``, ``tokens``,
``layers``, ``init_word``, ``base_hash`` and ``step`` in the header.

The reference writes, under ``<logdir>/checkpoints/``:

* ``embeddings_gs-{N}.pt``: ``{"string_to_token": {"*": tensor(id)}, "string_to_param":
  nn.ParameterDict({"*": (1, D)})}``;
* ``cross_attention-{N}.pt``: ``{"diffusion_model.<layer>.image_cross_attention.<param>": ...}``.

Both are read with ``torch.load(weights_only=True)``: no code from the file runs. The one class
the reference pickles, ``nn.ParameterDict``, is rebuilt as :class:`ParameterDictState` (a plain
dict of its tensors), never as the module. Written files use the real ``nn.ParameterDict``, so
the reference's ``EmbeddingManager.load`` reads them.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm.checkpoint import (
    UnsafeCheckpointError,
    load_state_dict,
    read_metadata,
    save_pickle,
    save_state_dict,
)
from ldm.modules.tokens import PLACEHOLDER_PARAM
from vico.hooks import BLOCKS, key_of

log = logging.getLogger(__name__)

ROWS = f"cond_stage_model.transformer.text_model.embeddings.token_embedding.{PLACEHOLDER_PARAM}"
PARAMETER_DICT = "torch.nn.modules.container.ParameterDict"
_REF_KEY = re.compile(rf"^(?:model\.)?diffusion_model\.(?P<layer>.+?)\.{BLOCKS}\.(?P<param>.+)$")
_OUR_KEY = re.compile(rf"^{BLOCKS}\.(?P<key>[^.]+)\.(?P<param>.+)$")
_STEP = re.compile(r"^embeddings_gs-(\d+)\.pt$")


class ParameterDictState(dict):
    """Stand-in for a pickled ``nn.ParameterDict``: keeps the tensors of its ``_parameters``."""

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        params = state.get("_parameters") or {}
        self.update({str(k): v for k, v in params.items() if isinstance(v, Tensor)})


def load_reference_pickle(path: str | Path) -> Any:
    """A reference ``.pt`` with tensors, plain containers and ``ParameterDict`` only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([(ParameterDictState, PARAMETER_DICT)]):
            return torch.load(
                path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
            )
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()
        reason = next((ln for ln in reason if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise UnsafeCheckpointError(
            f"{path}: refused: loading it would need code execution ({reason.strip()})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable torch checkpoint ({exc})") from None


# ---------------------------------------------------------------- reference layout
def reference_pair(path: str | Path, step: int | None = None) -> tuple[Path, Path, int]:
    """``(embeddings_gs-N.pt, cross_attention-N.pt, N)`` from a folder (the highest N unless
    ``step``) or from either file of a pair."""
    path = Path(path)
    if path.is_file():
        m = re.search(r"-(\d+)\.pt$", path.name)
        if not m:
            raise ValueError(f"{path}: expected embeddings_gs-N.pt or cross_attention-N.pt")
        folder, step = path.parent, int(m.group(1))
    elif path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        steps = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _STEP.match(p.name)))
        if not steps:
            raise FileNotFoundError(f"{folder}: no embeddings_gs-N.pt files")
        step = steps[-1] if step is None else int(step)
    else:
        raise FileNotFoundError(f"ViCo checkpoint not found: {path}")
    pair = folder / f"embeddings_gs-{step}.pt", folder / f"cross_attention-{step}.pt"
    for p in pair:
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing (a reference checkpoint is a pair of files)")
    return *pair, step


def from_reference(
    path: str | Path, step: int | None = None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a reference pair as ``(tensors in our keys, metadata)``."""
    emb_path, ca_path, step = reference_pair(path, step)
    emb = load_reference_pickle(emb_path)
    params = emb.get("string_to_param") if isinstance(emb, Mapping) else None
    if not isinstance(params, Mapping) or len(params) != 1:
        raise ValueError(f"{emb_path}: expected string_to_param with one placeholder")
    ((placeholder, row),) = params.items()
    tensors: dict[str, Tensor] = {ROWS: row.detach().reshape(1, -1).float()}
    layers: list[str] = []
    for key, value in load_reference_pickle(ca_path).items():
        m = _REF_KEY.match(str(key))
        if m is None or not isinstance(value, Tensor):
            continue
        if m["layer"] not in layers:
            layers.append(m["layer"])
        tensors[f"{BLOCKS}.{key_of(m['layer'])}.{m['param']}"] = value.detach()
    if not layers:
        raise ValueError(f"{ca_path}: no image_cross_attention tensors")
    meta = {
        "method": "vico",
        "placeholder": str(placeholder),
        "layers": json.dumps(sorted(layers, key=_layer_order)),
        "step": str(step),
    }
    return tensors, meta


def _layer_order(layer: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", layer))


def to_reference(
    tensors: Mapping[str, Tensor],
    meta: Mapping[str, str],
    folder: str | Path,
    step: int | None = None,
    token_id: int | None = None,
) -> tuple[Path, Path]:
    """Write ``embeddings_gs-N.pt`` and ``cross_attention-N.pt`` into ``folder``.

    ``token_id`` is the CLIP id the reference maps the placeholder to (265 for ``*``)."""
    folder = Path(folder)
    step = int(meta.get("step", 0)) if step is None else int(step)
    placeholder = meta.get("placeholder", "*")
    layers = {key_of(layer): layer for layer in json.loads(meta["layers"])}
    row = tensors[ROWS].detach().float()
    if row.shape[0] != 1:
        raise ValueError(f"expected one placeholder row, found {row.shape[0]}")
    params = nn.ParameterDict({placeholder: nn.Parameter(row.clone())})
    token = torch.tensor(-1 if token_id is None else int(token_id))
    emb = {"string_to_token": {placeholder: token}, "string_to_param": params}
    blocks = {}
    for key, value in tensors.items():
        m = _OUR_KEY.match(key)
        if m:
            blocks[f"diffusion_model.{layers[m['key']]}.{BLOCKS}.{m['param']}"] = value.detach()
    paths = folder / f"embeddings_gs-{step}.pt", folder / f"cross_attention-{step}.pt"
    save_pickle(emb, paths[0])
    save_pickle(blocks, paths[1])
    return paths


# ------------------------------------------------------------------- any layout
def read_vico(
    path: str | Path, step: int | None = None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of our ``.safetensors`` or a reference pair / folder."""
    path = Path(path)
    if path.suffix == ".safetensors":
        meta = read_metadata(path)
        if meta.get("method") != "vico":
            raise ValueError(f"{path}: not a ViCo checkpoint (method {meta.get('method')!r})")
        return load_state_dict(path), meta
    return from_reference(path, step)


def model_overrides(meta: Mapping[str, str]) -> dict[str, Any]:
    """ViCo constructor arguments that make a model fit a checkpoint's tensors."""
    out: dict[str, Any] = {"_target_": "vico.model.ViCo"}
    for key in ("placeholder", "init_word"):
        if meta.get(key):
            out[key] = meta[key]
    if meta.get("layers"):
        out["layers"] = json.loads(meta["layers"])
    return out


def apply_vico(model: nn.Module, tensors: Mapping[str, Tensor], where: str = "checkpoint") -> None:
    """Copy a checkpoint's token row and image blocks into a ``ViCo`` model."""
    own = model.state_dict(keep_vars=True)
    missing = sorted(set(model.vico_parameters()) - set(tensors))
    if missing:
        raise ValueError(f"{where}: lacks {len(missing)} ViCo tensors of this model ({missing[0]})")
    for key, value in tensors.items():
        if key not in own:
            raise ValueError(f"{where}: {key} is not a tensor of this ViCo model")
        if own[key].shape != value.shape:
            raise ValueError(
                f"{where}: {key} is {tuple(value.shape)}, the model's {tuple(own[key].shape)} "
                "(trained on another base?)"
            )
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)
    log.info("loaded ViCo %s: %d tensors", where, len(tensors))


def save_vico(model: nn.Module, path: str | Path) -> Path:
    """Write our ``.safetensors`` checkpoint of ``model``."""
    path = Path(path)
    save_state_dict(model.export_state_dict(), path, metadata=model.export_metadata())
    return path
