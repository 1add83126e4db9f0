"""Custom Diffusion delta files of other tools, to and from our ``.safetensors`` deltas.

``compvis``    the reference's ``delta_epoch=*.ckpt``: ``{"state_dict": {<UNet keys>: W, "embed":
               (n_tokens, D)}}``; a compressed delta keeps ``{"u": u, "v": v}`` per key as the
               reference's ``compressed_delta_*.ckpt`` (reconstructed as W0 + u @ v).
``adobe``      the reference's diffusers scripts' ``delta.bin``: ``{"unet": {<diffusers UNet
               parameter>: W}, "modifier_token": {token: (D,)}}``.
``diffusers``  a folder as diffusers' ``train_custom_diffusion.py`` saves it:
               ``pytorch_custom_diffusion_weights.{bin,safetensors}`` with keys
               ``<attention>.processor.to_k_custom_diffusion.weight`` (full weights; the ``.bin``
               also has the ``{}`` entries of the weightless processors that diffusers'
               ``load_attn_procs`` needs) and one ``<token>.{bin,safetensors}`` per token,
               ``{token: (D,)}``. Load it into a pipeline with
               :func:`custom.diffusers_loader.load_custom_diffusion`.

Our header (tokens, base, method) rides along where the format allows it (``metadata`` beside
``state_dict``; the safetensors header), so our own exports import without a base. Files of the
other tools carry no base: importing them needs the base model, for its fingerprint. Their
tokens have no names in ``compvis`` files: the reference names them ``<new1>, <new2>, ...``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from custom.compress import SVD_U, SVD_V, compressed_keys, is_compressed
from custom.delta import load_delta
from ldm.checkpoint import load_pickle, load_state_dict, read_metadata, save_pickle
from ldm.checkpoint import save_state_dict as save_tensors
from ldm.convert import TEXT_PREFIX, UNET_PREFIX, unet_key_pairs
from ldm.modules.tokens import PLACEHOLDER_PARAM

log = logging.getLogger(__name__)

FORMATS = ("compvis", "adobe", "diffusers")
ROWS = f"{TEXT_PREFIX}text_model.embeddings.token_embedding.{PLACEHOLDER_PARAM}"
EMBED = "embed"  # compvis: the token rows
DIFFUSERS_WEIGHTS = "pytorch_custom_diffusion_weights"
REFERENCE_TOKENS = "<new{}>"  # how the reference names the rows of a compvis ``embed``
# diffusers processor parameter <-> attention module parameter
PROCESSOR_PARAMS = {
    "to_k_custom_diffusion.weight": "to_k.weight",
    "to_v_custom_diffusion.weight": "to_v.weight",
    "to_q_custom_diffusion.weight": "to_q.weight",
    "to_out_custom_diffusion.0.weight": "to_out.0.weight",
    "to_out_custom_diffusion.0.bias": "to_out.0.bias",
}
PARAM_PROCESSOR = {v: k for k, v in PROCESSOR_PARAMS.items()}


@dataclass
class Delta:
    """Tensors by model key (full values, or SVD factors), token names in row order, and the
    header metadata (possibly partial for other tools' files)."""

    tensors: dict[str, Tensor]
    tokens: list[str]
    meta: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> Delta:
        """One of our ``.safetensors`` deltas."""
        tensors, meta = load_delta(path)
        return cls(tensors, json.loads(meta.get("tokens", "[]")), meta)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        save_tensors(self.tensors, path, metadata={**self.meta, "tokens": json.dumps(self.tokens)})
        return path


def reference_tokens(n: int) -> list[str]:
    return [REFERENCE_TOKENS.format(i + 1) for i in range(n)]


def _rows(tensors: Mapping[str, Tensor], tokens: Sequence[str]) -> Tensor | None:
    rows = tensors.get(ROWS)
    if rows is not None and rows.shape[0] != len(tokens):
        raise ValueError(f"{rows.shape[0]} token rows but {len(tokens)} tokens {list(tokens)}")
    return rows


def _pick_tokens(n: int, tokens: Sequence[str] | None, found: Sequence[str] | None) -> list[str]:
    names = list(tokens) if tokens else list(found or []) or reference_tokens(n)
    if len(names) != n:
        raise ValueError(f"{n} token rows but {len(names)} token names {names}")
    return names


# --------------------------------------------------------------------------------- compvis
def to_compvis(delta: Delta) -> dict[str, Any]:
    t = delta.tensors
    sd: dict[str, Any] = {k: v for k, v in t.items() if k.startswith(UNET_PREFIX)}
    for key in compressed_keys(t):
        sd.pop(key + SVD_U), sd.pop(key + SVD_V)
        sd[key] = {"u": t[key + SVD_U], "v": t[key + SVD_V]}
    rows = _rows(t, delta.tokens)
    if rows is not None:
        sd[EMBED] = rows
    return {"state_dict": sd, "metadata": {**delta.meta, "tokens": json.dumps(delta.tokens)}}


def from_compvis(obj: Any, tokens: Sequence[str] | None = None) -> Delta:
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping):
        raise ValueError("not a compvis delta: no state_dict")
    meta = dict(obj.get("metadata") or {})
    tensors: dict[str, Tensor] = {}
    for key, value in obj["state_dict"].items():
        if key == EMBED:
            tensors[ROWS] = value
        elif isinstance(value, Mapping) and set(value) == {"u", "v"}:
            tensors[key + SVD_U], tensors[key + SVD_V] = value["u"], value["v"]
            meta.setdefault("compression", "svd")
        elif isinstance(value, Tensor) and key.startswith(UNET_PREFIX):
            tensors[key] = value
        else:
            raise ValueError(f"not a compvis delta: unexpected entry {key!r}")
    n = tensors[ROWS].shape[0] if ROWS in tensors else 0
    found = json.loads(meta["tokens"]) if "tokens" in meta else None
    return Delta(tensors, _pick_tokens(n, tokens, found), meta)


# ------------------------------------------------------------------------ diffusers names
def _attention_names(unet_params: Mapping[str, Any]) -> dict[str, str]:
    """CompVis key -> diffusers UNet parameter name, for every attention parameter."""
    pairs = unet_key_pairs(unet_params)
    return {UNET_PREFIX + c: d for c, d in pairs if ".attn1." in d or ".attn2." in d}


def _unet_to_diffusers(delta: Delta, unet_params: Mapping[str, Any]) -> dict[str, Tensor]:
    if is_compressed(delta.meta):
        raise ValueError("expand a compressed delta before writing it in this format")
    names = _attention_names(unet_params)
    unet = {k: v for k, v in delta.tensors.items() if k.startswith(UNET_PREFIX)}
    unknown = [k for k in unet if k not in names]
    if unknown:
        raise ValueError(f"{len(unknown)} delta keys are not attention weights of this UNet config"
                         f" (e.g. {unknown[0]})")  # fmt: skip
    return {names[k]: v for k, v in unet.items()}


def _unet_from_diffusers(unet: Mapping[str, Tensor], unet_params: Mapping[str, Any]) -> dict:
    names = {d: c for c, d in _attention_names(unet_params).items()}
    unknown = [k for k in unet if k not in names]
    if unknown:
        raise ValueError(f"{len(unknown)} keys are not attention weights of this UNet config"
                         f" (e.g. {unknown[0]})")  # fmt: skip
    return {names[k]: v for k, v in unet.items()}


# ---------------------------------------------------------------------------------- adobe
def to_adobe(delta: Delta, unet_params: Mapping[str, Any]) -> dict[str, Any]:
    rows = _rows(delta.tensors, delta.tokens)
    tokens = {t: rows[i].clone() for i, t in enumerate(delta.tokens)} if rows is not None else {}
    meta = {**delta.meta, "tokens": json.dumps(delta.tokens)}
    return {"unet": _unet_to_diffusers(delta, unet_params), "modifier_token": tokens,
            "metadata": meta}  # fmt: skip


def from_adobe(obj: Any, unet_params: Mapping[str, Any], tokens=None) -> Delta:
    if not isinstance(obj, Mapping) or not isinstance(obj.get("unet"), Mapping):
        raise ValueError("not an adobe delta.bin: no 'unet' entry")
    tensors = _unet_from_diffusers(obj["unet"], unet_params)
    rows = dict(obj.get("modifier_token") or {})
    if rows:
        tensors[ROWS] = torch.stack([torch.as_tensor(v).reshape(-1) for v in rows.values()])
    names = _pick_tokens(len(rows), tokens, list(rows))
    return Delta(tensors, names, dict(obj.get("metadata") or {}))


# ------------------------------------------------------------------------------ diffusers
def _processor_entries(delta: Delta, unet_params: Mapping[str, Any]) -> dict[str, Tensor]:
    out = {}
    for name, value in _unet_to_diffusers(delta, unet_params).items():
        module, param = re.match(r"(.*\.attn[12])\.(.*)$", name).groups()
        if param not in PARAM_PROCESSOR:
            raise ValueError(f"{name} has no diffusers custom diffusion processor parameter")
        out[f"{module}.processor.{PARAM_PROCESSOR[param]}"] = value.contiguous()
    return out


def write_diffusers_delta(
    delta: Delta, unet_params: Mapping[str, Any], out_dir: str | Path, overwrite: bool = False
) -> Path:
    """Write ``delta`` (full values) as a diffusers custom diffusion folder, atomically."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (use --overwrite to replace it)")
    weights = _processor_entries(delta, unet_params)
    # Every attention layer's processor: those without weights get a {} entry in the .bin.
    processors = {
        name.removesuffix(".to_q.weight") + ".processor"
        for name in _attention_names(unet_params).values()
        if name.endswith(".to_q.weight")
    }
    with_weights = {k.split(".processor.")[0] + ".processor" for k in weights}
    placeholders = sorted(processors - with_weights)
    rows = _rows(delta.tensors, delta.tokens)
    meta = {**delta.meta, "tokens": json.dumps(delta.tokens)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_pickle({**weights, **{p: {} for p in placeholders}}, tmp / f"{DIFFUSERS_WEIGHTS}.bin")
        save_tensors(weights, tmp / f"{DIFFUSERS_WEIGHTS}.safetensors", metadata=meta)
        for i, token in enumerate(delta.tokens):
            row = {token: rows[i].clone().contiguous()}
            save_pickle(row, tmp / f"{token}.bin")
            save_tensors(row, tmp / f"{token}.safetensors")
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def read_diffusers_weights(path: str | Path) -> tuple[dict[str, Any], dict[str, str], Path]:
    """``(entries, header metadata, folder)`` of a custom diffusion weights file or folder."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        found = [path / f"{DIFFUSERS_WEIGHTS}.{e}" for e in ("safetensors", "bin")]
        found = [p for p in found if p.exists()]
        if not found:
            raise FileNotFoundError(f"no {DIFFUSERS_WEIGHTS}.safetensors or .bin in {path}")
        path = found[0]
    if path.suffix == ".safetensors":
        return load_state_dict(path), read_metadata(path), folder
    entries = load_pickle(path)
    if not isinstance(entries, Mapping):
        raise ValueError(f"{path}: not a custom diffusion weights file")
    return dict(entries), {}, folder


def read_token_files(folder: Path, order: Sequence[str] | None = None) -> dict[str, Tensor]:
    """``{token: row}`` from the ``<token>.safetensors`` / ``.bin`` files of ``folder``."""
    rows: dict[str, Tensor] = {}
    files = sorted(folder.iterdir(), key=lambda p: _natural(p.name))
    for file in files:
        if file.stem.startswith(DIFFUSERS_WEIGHTS) or file.suffix not in (".safetensors", ".bin"):
            continue
        sd = load_state_dict(file) if file.suffix == ".safetensors" else load_pickle(file)
        if not isinstance(sd, Mapping) or len(sd) != 1:
            log.warning("skipping %s: not a single-token embedding file", file)
            continue
        (token, row), = sd.items()  # fmt: skip
        rows.setdefault(token, torch.as_tensor(row).reshape(-1))
    if order:
        missing = [t for t in order if t not in rows]
        if missing:
            raise FileNotFoundError(f"{folder}: no embedding file for tokens {missing}")
        rows = {t: rows[t] for t in order}
    return rows


def from_diffusers(path: str | Path, unet_params: Mapping[str, Any], tokens=None) -> Delta:
    entries, meta, folder = read_diffusers_weights(path)
    unet = {}
    for key, value in entries.items():
        if not isinstance(value, Tensor):
            continue  # the {} entries of weightless processors
        module, param = key.split(".processor.", 1) if ".processor." in key else (key, "")
        if param not in PROCESSOR_PARAMS:
            raise ValueError(f"not a custom diffusion weights entry: {key!r}")
        unet[f"{module}.{PROCESSOR_PARAMS[param]}"] = value
    tensors = _unet_from_diffusers(unet, unet_params)
    order = json.loads(meta["tokens"]) if "tokens" in meta else None
    rows = read_token_files(folder, order)
    if rows:
        tensors[ROWS] = torch.stack(list(rows.values()))
    return Delta(tensors, _pick_tokens(len(rows), tokens, list(rows)), meta)


# ----------------------------------------------------------------------------- dispatch
def export(delta: Delta, fmt: str, out: str | Path, unet_params=None, overwrite=False) -> Path:
    """Write ``delta`` in format ``fmt`` (``adobe`` / ``diffusers`` need the UNet params and
    full values)."""
    out = Path(out)
    if fmt == "diffusers":
        return write_diffusers_delta(delta, unet_params, out, overwrite)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (use --overwrite to replace it)")
    if fmt == "compvis":
        save_pickle(to_compvis(delta), out)
    elif fmt == "adobe":
        save_pickle(to_adobe(delta, unet_params), out)
    else:
        raise ValueError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    return out


def read(src: str | Path, fmt: str, unet_params=None, tokens=None) -> Delta:
    """A delta file of another tool (format ``fmt``) as a :class:`Delta`."""
    if fmt == "compvis":
        return from_compvis(load_pickle(src), tokens)
    if fmt == "adobe":
        return from_adobe(load_pickle(src), unet_params, tokens)
    if fmt == "diffusers":
        return from_diffusers(src, unet_params, tokens)
    raise ValueError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
