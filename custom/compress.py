"""Low-rank compression of Custom Diffusion deltas (the reference ``src/compress.py``).

Each trained UNet matrix W (``attn2.to_k/to_v``, and ``to_q/to_out`` for ``crossattn``) is
stored as the factors of a truncated SVD of its DIFFERENCE from the base weights::

    W - W0 = U S V^T  ->  u = U_r S_r  (d_out, r),  v = V_r^T  (r, d_in),   W = W0 + u @ v

under the keys ``<key>.svd_u`` / ``<key>.svd_v``. Token rows and vectors (biases) are kept as
they are. The rank follows the reference's rule on the singular values themselves (not their
squares): with cumulative fractions f_i = (s_0 + ... + s_i) / sum(s), r is the first index with
f_i > ``ratio`` (0.6), and the r leading components are kept -- one fewer than the component
that crossed. The one deviation: at least one component is kept (the reference keeps none when
s_0 alone exceeds the ratio, dropping the whole difference). ``rank`` sets r directly instead.

The header records ``compression=svd``, the rule and ``kv_base_hash``, a fingerprint of the base
values of the compressed keys: :func:`expand` checks it, because a compressed delta is only
meaningful on exactly that W0 (the ``base_hash`` of every delta skips its own keys).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

import torch
from torch import Tensor

from custom.delta import DeltaMismatchError
from ldm.checkpoint import fingerprint

log = logging.getLogger(__name__)

COMPRESSION = "svd"
SVD_U, SVD_V = ".svd_u", ".svd_v"
DEFAULT_RATIO = 0.6  # the reference's compression_ratio


def is_compressed(meta: Mapping[str, str]) -> bool:
    return meta.get("compression") == COMPRESSION


def energy_rank(s: Tensor, ratio: float = DEFAULT_RATIO) -> int:
    """Components kept for singular values ``s`` (descending) by the reference rule (>= 1)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"compression ratio must be in (0, 1], got {ratio}")
    s = s.double()
    total = float(s.sum())
    if total == 0:
        return 1
    crossed = torch.nonzero(s.cumsum(0) / total > ratio)
    r = int(crossed[0]) if len(crossed) else len(s)
    return max(r, 1)


def low_rank(diff: Tensor, ratio: float = DEFAULT_RATIO, rank: int | None = None) -> tuple:
    """``(u, v)`` with ``u @ v`` the rank-r SVD truncation of ``diff`` (d_out, d_in)."""
    u, s, vt = torch.linalg.svd(diff.double(), full_matrices=False)
    r = min(rank, len(s)) if rank is not None else energy_rank(s, ratio)
    if r < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    return (u[:, :r] * s[:r]).to(diff.dtype), vt[:r].to(diff.dtype)


def _compressible(key: str, value: Tensor) -> bool:
    return value.ndim == 2 and key.startswith("model.diffusion_model.")


def kv_hash(base: Mapping[str, Tensor], keys: list[str]) -> str:
    return fingerprint({k: base[k] for k in keys}, ignore=())


def compress(
    tensors: Mapping[str, Tensor],
    meta: Mapping[str, str],
    base: Mapping[str, Tensor],
    ratio: float = DEFAULT_RATIO,
    rank: int | None = None,
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A full delta -> its compressed form against ``base`` (a state dict of the base model).

    Returns ``(tensors, metadata)``; the metadata gains ``compression``, ``compression_ratio``
    or ``compression_rank``, ``ranks`` (JSON, per key) and ``kv_base_hash``.
    """
    if is_compressed(meta):
        raise ValueError("the delta is already compressed")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    out: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    for key, value in tensors.items():
        if not _compressible(key, value):
            out[key] = value
            continue
        if key not in base or base[key].shape != value.shape:
            raise DeltaMismatchError(f"the base has no tensor {key} of shape {tuple(value.shape)}")
        diff = value.float() - base[key].float()
        u, v = low_rank(diff, ratio, rank)
        out[key + SVD_U], out[key + SVD_V] = u.to(value.dtype), v.to(value.dtype)
        ranks[key] = u.shape[1]
    if not ranks:
        raise ValueError("the delta has no UNet matrices to compress")
    rule = {"compression_rank": str(rank)} if rank else {"compression_ratio": str(ratio)}
    extra = {
        "compression": COMPRESSION,
        **rule,
        "ranks": json.dumps(ranks),
        "kv_base_hash": kv_hash(base, sorted(ranks)),
    }
    return out, {**meta, **extra}


def compressed_keys(tensors: Mapping[str, Tensor]) -> list[str]:
    """The model keys whose values a compressed delta holds as factors."""
    return sorted(k[: -len(SVD_U)] for k in tensors if k.endswith(SVD_U))


def model_keys(tensors: Mapping[str, Tensor]) -> list[str]:
    """The model keys a delta (compressed or not) sets."""
    plain = [k for k in tensors if not k.endswith((SVD_U, SVD_V))]
    return sorted(plain + compressed_keys(tensors))


def expand(
    tensors: Mapping[str, Tensor],
    meta: Mapping[str, str],
    base: Mapping[str, Tensor],
    force: bool = False,
) -> dict[str, Tensor]:
    """Full values ``W0 + u @ v`` of a compressed delta (other deltas are returned as they are).

    Raises:
        DeltaMismatchError: ``base`` is not the W0 the delta was compressed against (unless
            ``force``), or lacks a key.
    """
    if not is_compressed(meta):
        return dict(tensors)
    keys = compressed_keys(tensors)
    missing = [k for k in keys if k not in base]
    if missing:
        raise DeltaMismatchError(f"the base has no tensor {missing[0]} ({len(missing)} missing)")
    found = kv_hash(base, keys)
    # Other tools' compressed files record no base: they cannot be checked.
    if meta.get("kv_base_hash", found) != found:
        msg = (
            f"compressed against base weights {meta.get('kv_base_hash')}, these are {found} "
            "(another base, or a delta already applied)"
        )
        if not force:
            raise DeltaMismatchError(msg)
        log.warning("%s; expanding anyway (forced)", msg)
    out = {k: v for k, v in tensors.items() if not k.endswith((SVD_U, SVD_V))}
    for key in keys:
        u, v = tensors[key + SVD_U], tensors[key + SVD_V]
        w0 = base[key]
        out[key] = (w0.float() + u.float() @ v.float()).to(w0.dtype).cpu()
    return out


def nbytes(tensors: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
