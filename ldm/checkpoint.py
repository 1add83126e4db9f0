"""Checkpoint I/O: load weights without executing code, save atomically, report key mismatches.

* ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin`` are pickles: they are read with
  ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers. A pickle that
  names any other global (``os.system``, a class with ``__reduce__``, ...) is refused with
  :class:`UnsafeCheckpointError` before any of its code can run. The only extra names accepted are
  :data:`INERT_GLOBALS` (Lightning / numpy training metadata found next to the ``state_dict`` of
  e.g. ``sd-v1-4.ckpt``); they are replaced by an inert placeholder, so no code of theirs runs.
* ``.safetensors`` files hold raw tensors only.
* A directory is a diffusers pipeline folder; it is converted to the CompVis layout.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ldm.modules.tokens import PLACEHOLDER_PARAM

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
# Keys that never matter when loading: the CLIP position-id buffer (absent from new transformers
# state dicts, present in old checkpoints) and the EMA copy of full-EMA training checkpoints.
DEFAULT_IGNORE: tuple[str, ...] = (r"(^|\.)position_ids$", r"^model_ema\.")
# Not part of a base model's identity: those, plus placeholder-token rows added for training.
FINGERPRINT_IGNORE: tuple[str, ...] = (*DEFAULT_IGNORE, rf"(^|\.){PLACEHOLDER_PARAM}$")
# Training metadata that sits next to ``state_dict`` in Lightning checkpoints (callback state
# keyed by the callback class, numpy scalars for scores). Replaced by `_Inert` on load.
INERT_GLOBALS: tuple[str, ...] = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
)


class UnsafeCheckpointError(RuntimeError):
    """A pickle checkpoint that could only be loaded by executing code from the file."""


class _Inert:
    """Stand-in for an :data:`INERT_GLOBALS` name: accepts any arguments and state, keeps none."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _unsafe_reason(path: Path, exc: BaseException) -> str:
    """Which globals made the weights-only unpickler refuse ``path`` (scanned, never executed)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        names = [n for n in names if n not in INERT_GLOBALS]
        if names:
            return "globals " + ", ".join(names[:5])
    except Exception:  # noqa: BLE001 - legacy (non-zip) format: fall back to torch's message
        pass
    lines = [ln.strip() for ln in str(exc).splitlines()]
    hits = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln or "Can only build" in ln]
    return hits[0] if hits else _first_line(exc)


def _torch_load(path: Path) -> Any:
    placeholders = [(_Inert, name) for name in INERT_GLOBALS]
    try:
        with torch.serialization.safe_globals(placeholders):
            return torch.load(
                path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
            )
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path}: refused: loading this file would need code execution "
            f"({_unsafe_reason(path, exc)}); if it is trusted, re-save it as .safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable torch checkpoint ({_first_line(exc)})") from None


def _tensors_only(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap ``{"state_dict": ...}`` and keep the tensor entries."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    dropped = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if dropped:
        log.warning("%s: ignoring %d non-tensor entries (%s)", path, len(dropped), dropped[:5])
    if not sd:
        raise ValueError(f"{path}: no tensors found")
    return sd


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint as a flat ``{key: tensor}`` dict in the CompVis layout.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown extension or unreadable file.
        UnsafeCheckpointError: a pickle that needs code execution (nothing of it has run).
    """
    path = Path(path)
    if path.is_dir():
        from ldm.convert import read_diffusers

        return read_diffusers(path)[0]
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        try:
            return load_file(path)
        except (SafetensorError, OSError) as exc:
            reason = _first_line(exc)
            raise ValueError(f"{path}: not a readable safetensors file ({reason})") from None
    if suffix in PICKLE_SUFFIXES:
        return _tensors_only(_torch_load(path), path)
    raise ValueError(
        f"{path}: unknown checkpoint type {suffix!r} "
        "(expected .safetensors, .ckpt, .pt, .pth, .bin or a diffusers folder)"
    )


def _for_safetensors(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense, contiguous CPU tensors with no storage shared between entries."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in sd.items():
        tensor = value.detach().cpu()
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        elif tensor.numel() and tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        if tensor.numel():
            seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def save_state_dict(
    sd: Mapping[str, torch.Tensor],
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``sd`` as ``.safetensors`` or as a ``{"state_dict": sd}`` ``.ckpt``.

    ``metadata`` (strings) goes into the safetensors header, or beside ``state_dict`` in a
    pickle (only when given); :func:`read_metadata` reads it back. The data goes to a temporary
    file in the same directory that is renamed over ``path`` only once complete, so a failed save
    leaves any existing file untouched.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix != SAFETENSORS_SUFFIX and suffix not in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: cannot save as {suffix!r} (use .safetensors or .ckpt)")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"state dict entries must be tensors; not: {bad[:5]}")
    meta = {"format": "pt", **(metadata or {})}
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"metadata keys and values must be strings; not: {bad[:5]}")
    if suffix == SAFETENSORS_SUFFIX:
        _write_atomically(path, lambda tmp: save_file(_for_safetensors(sd), tmp, metadata=meta))
    else:
        extra = {"metadata": meta} if metadata else {}
        save_pickle({"state_dict": dict(sd), **extra}, path)


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_pickle(obj: Any, path: str | Path) -> None:
    """``torch.save`` of tensors in plain containers, written atomically (as
    :func:`save_state_dict`), for formats that nest dicts (e.g. other tools' delta files)."""
    path = Path(path)
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: a pickle needs one of the suffixes {PICKLE_SUFFIXES}")
    _write_atomically(path, lambda tmp: torch.save(obj, tmp))


def load_pickle(path: str | Path) -> Any:
    """The whole object of a pickle checkpoint (nested dicts, Lightning training state), read as
    safely as :func:`load_state_dict` reads it: tensors and plain containers only.

    Raises:
        FileNotFoundError, ValueError, UnsafeCheckpointError: as :func:`load_state_dict`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: not a pickle checkpoint (expected {', '.join(PICKLE_SUFFIXES)})")
    return _torch_load(path)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata :func:`save_state_dict` stored in ``path`` (empty if none)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        try:
            with safe_open(path, framework="pt") as f:
                return dict(f.metadata() or {})
        except (SafetensorError, OSError) as exc:
            raise ValueError(
                f"{path}: not a readable safetensors file ({_first_line(exc)})"
            ) from None
    obj = _torch_load(path)
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, Mapping) else {}


def fingerprint(
    sd: Mapping[str, torch.Tensor],
    exclude: Iterable[str] = (),
    ignore: Sequence[str] = FINGERPRINT_IGNORE,
    samples: int = 64,
    digests: Mapping[str, bytes] | None = None,
) -> str:
    """A cheap, stable identity of a set of weights: 16 hex digits.

    Hashes every key (sorted) with its shape and ``samples`` evenly spaced values rounded to
    float16, so it costs milliseconds even for SD, does not depend on the device, and is equal
    for an fp32 model and its fp16 copy. Keys in ``exclude`` or matching ``ignore`` are skipped.
    ``digests`` (from :func:`key_digest`) stand in for the tensors of their keys.
    """
    skip = set(exclude)
    patterns = [re.compile(p) for p in ignore]
    digests = digests or {}
    h = hashlib.sha256()
    for key in sorted(sd):
        if key in skip or any(p.search(key) for p in patterns):
            continue
        h.update(digests[key] if key in digests else key_digest(key, sd[key], samples))
    return h.hexdigest()[:16]


def key_digest(key: str, tensor: torch.Tensor, samples: int = 64) -> bytes:
    """What :func:`fingerprint` hashes for one tensor."""
    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    # float32 linspace can round the last index up to n on tensors over 2**24 elements.
    idx = torch.linspace(0, max(n - 1, 0), min(n, samples)).round().long().clamp_max(max(n - 1, 0))
    values = flat[idx.to(flat.device)].float().cpu().to(torch.float16)
    return f"{key}:{tuple(tensor.shape)}:".encode() + values.numpy().tobytes()


def summarize_keys(missing: Sequence[str], unexpected: Sequence[str], max_names: int = 5) -> str:
    """One line: ``"12 missing (a, b, c, d, e, ...), 3 unexpected (x, y, z)"``."""

    def part(names: Sequence[str], label: str) -> str:
        if not names:
            return f"0 {label}"
        shown = ", ".join(names[:max_names]) + (", ..." if len(names) > max_names else "")
        return f"{len(names)} {label} ({shown})"

    return f"{part(list(missing), 'missing')}, {part(list(unexpected), 'unexpected')}"


def load_into(
    model: torch.nn.Module,
    sd: Mapping[str, torch.Tensor],
    *,
    strict: bool = False,
    ignore: Sequence[str] = DEFAULT_IGNORE,
) -> tuple[list[str], list[str]]:
    """Load ``sd`` into ``model`` and log one line about missing / unexpected keys.

    Keys matching a regex in ``ignore`` are not reported. Returns the reported
    ``(missing, unexpected)``. Raises ``ValueError`` (one line) on shape mismatches, and
    ``RuntimeError`` if ``strict`` and a relevant key is missing; nothing is loaded then.
    """
    patterns = [re.compile(p) for p in ignore]

    def relevant(key: str) -> bool:
        return not any(p.search(key) for p in patterns)

    own = model.state_dict()
    name = type(model).__name__
    missing = [k for k in own if k not in sd and relevant(k)]
    unexpected = [k for k in sd if k not in own and relevant(k)]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if shapes:
        more = ", ..." if len(shapes) > 3 else ""
        raise ValueError(f"{name}: {len(shapes)} shape mismatches: {', '.join(shapes[:3])}{more}")
    summary = summarize_keys(missing, unexpected)
    if strict and missing:
        raise RuntimeError(f"strict load into {name} failed: {summary}")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    level = logging.WARNING if missing or unexpected else logging.INFO
    loaded = sum(k in own for k in sd)
    log.log(level, "loaded %d tensors into %s: %s", loaded, name, summary)
    return missing, unexpected
