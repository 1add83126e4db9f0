"""Checkpoint I/O: no code execution on load, atomic saves, one-line key reports."""

from __future__ import annotations

import builtins
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import ldm.checkpoint as ckpt
from ldm.checkpoint import (
    UnsafeCheckpointError,
    load_into,
    load_state_dict,
    save_state_dict,
    summarize_keys,
)


def small_sd(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(3, 4, generator=g),
        "layer.bias": torch.randn(3, generator=g),
    }


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


class Payload:
    """Unpickling this runs ``func(*args)``, as a malicious checkpoint would."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker: Path) -> dict[str, Payload]:
    return {
        "open": Payload(builtins.open, str(marker), "w"),
        "os.system": Payload(os.system, f"touch {marker}"),
        "exec": Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
    }


# ----------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("kind", ["open", "os.system", "exec"])
@pytest.mark.parametrize("fmt", ["torch.save", "raw pickle"])
def test_code_carrying_pickle_is_refused_and_never_runs(tmp_path, kind, fmt):
    marker = tmp_path / "pwned"
    obj = {"state_dict": small_sd(), "extra": payloads(marker)[kind]}
    path = tmp_path / "evil.ckpt"
    if fmt == "torch.save":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(UnsafeCheckpointError) as info:
        load_state_dict(path)
    assert not marker.exists()
    message = str(info.value)
    assert "\n" not in message and "code execution" in message and ".safetensors" in message
    if fmt == "torch.save":
        assert {"open": "io.open", "os.system": ".system", "exec": "builtins.exec"}[kind] in message
    assert isinstance(info.value, RuntimeError)


def test_lightning_metadata_loads_as_inert_placeholders(tmp_path):
    """sd-v1-4.ckpt-style: callback state keyed by the ModelCheckpoint class, numpy scores."""
    from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint

    sd = small_sd()
    meta = {"best_model_score": np.float64(0.5), "history": np.zeros(3)}
    torch.save({"state_dict": sd, "callbacks": {ModelCheckpoint: meta}, "global_step": 470000},
               tmp_path / "lightning.ckpt")  # fmt: skip
    assert_same(load_state_dict(tmp_path / "lightning.ckpt"), sd)


def test_normal_formats_load(tmp_path):
    sd = small_sd()
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 10}, tmp_path / "wrapped.ckpt")
    torch.save(sd, tmp_path / "flat.pt")
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    save_file(sd, tmp_path / "flat.safetensors")
    for name in ("wrapped.ckpt", "flat.pt", "legacy.pth", "flat.safetensors"):
        assert_same(load_state_dict(tmp_path / name), sd)
    assert_same(load_state_dict(str(tmp_path / "wrapped.ckpt")), sd)


def test_bad_paths_give_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_state_dict(tmp_path / "missing.ckpt")
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown checkpoint type '.txt'"):
        load_state_dict(tmp_path / "weights.txt")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "bad.safetensors").write_bytes(os.urandom(64))
    for name in ("empty.ckpt", "bad.safetensors"):
        with pytest.raises(ValueError) as info:
            load_state_dict(tmp_path / name)
        assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="not a diffusers SD folder"):
        load_state_dict(tmp_path)


# ------------------------------------------------------------------------------------ saving
def test_save_roundtrip_with_shared_and_strided_tensors(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    sd = {"a": base, "tied": base, "row": base[1], "t": base.T, "half": torch.ones(2).half()}
    for name in ("out.safetensors", "out.ckpt"):
        save_state_dict(sd, tmp_path / name)
        assert_same(load_state_dict(tmp_path / name), sd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.ckpt", "out.safetensors"]
    assert torch.load(tmp_path / "out.ckpt", weights_only=True).keys() == {"state_dict"}


@pytest.mark.parametrize("name", ["model.safetensors", "model.ckpt"])
def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch, name):
    path = tmp_path / name
    save_state_dict(small_sd(0), path)
    before = path.read_bytes()

    def crash(obj, target, *args, **kwargs):
        Path(target).write_bytes(b"half-written")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_state_dict(small_sd(1), path)
    with pytest.raises(TypeError, match="must be tensors"):
        save_state_dict({"step": 3}, path)  # type: ignore[dict-item]
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left behind
    with pytest.raises(ValueError, match="cannot save"):
        save_state_dict(small_sd(), tmp_path / "model.npz")


# ------------------------------------------------------------------------------ key reports
def test_summarize_keys_is_one_line():
    missing = [f"k{i}" for i in range(12)]
    line = summarize_keys(missing, ["x", "y", "z"])
    assert line == "12 missing (k0, k1, k2, k3, k4, ...), 3 unexpected (x, y, z)"
    assert summarize_keys([], []) == "0 missing, 0 unexpected"
    assert summarize_keys(["a", "b"], [], max_names=1) == "2 missing (a, ...), 0 unexpected"


def test_load_into_ignores_position_ids_and_ema(caplog):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    sd = {f"0.{k.split('.')[1]}": v for k, v in small_sd().items()}
    sd["text.embeddings.position_ids"] = torch.arange(77)
    sd["model_ema.decay"] = torch.tensor(0.999)
    sd["stray.weight"] = torch.zeros(1)
    with caplog.at_level(logging.INFO, logger="ldm.checkpoint"):
        missing, unexpected = load_into(model, sd)
    assert missing == ["1.weight", "1.bias"] and unexpected == ["stray.weight"]
    assert torch.equal(model[0].weight, sd["0.weight"])
    (record,) = caplog.records
    assert "\n" not in record.getMessage()
    assert "2 missing (1.weight, 1.bias), 1 unexpected (stray.weight)" in record.getMessage()

    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    before = fresh[0].weight.clone()
    with pytest.raises(RuntimeError, match=r"^strict load into Sequential failed: 2 missing"):
        load_into(fresh, sd, strict=True)
    assert torch.equal(fresh[0].weight, before)  # nothing loaded on a failed strict load
    plain = {k.removeprefix("layer."): v for k, v in small_sd().items()}
    assert load_into(fresh[0], plain, strict=True) == ([], [])
    with pytest.raises(ValueError, match="1 shape mismatches: layer.weight"):
        load_into(torch.nn.ModuleDict({"layer": torch.nn.Linear(5, 3)}), small_sd())


def test_metadata_round_trip(tmp_path):
    from ldm.checkpoint import read_metadata

    sd = small_sd()
    for name in ("m.safetensors", "m.ckpt"):
        save_state_dict(sd, tmp_path / name, metadata={"method": "x", "step": "3"})
        meta = read_metadata(tmp_path / name)
        assert meta["method"] == "x" and meta["step"] == "3"
        assert_same(load_state_dict(tmp_path / name), sd)
    save_state_dict(sd, tmp_path / "plain.ckpt")
    assert read_metadata(tmp_path / "plain.ckpt") == {}
    with pytest.raises(TypeError, match="strings"):
        save_state_dict(sd, tmp_path / "bad.safetensors", metadata={"step": 3})


def test_fingerprint_is_stable_cheap_and_selective():
    from ldm.checkpoint import fingerprint

    sd = {**small_sd(), "big": torch.randn(1000, 100)}
    ref = fingerprint(sd)
    assert len(ref) == 16 and ref == fingerprint({k: v.clone() for k, v in sd.items()})
    assert fingerprint({k: v.half() for k, v in sd.items()}) == ref  # an fp16 copy is the same base
    changed = {**sd, "big": sd["big"].clone()}
    changed["big"].view(-1)[-1] += 1.0  # the last element is always sampled
    assert fingerprint(changed) != ref
    assert fingerprint(changed, exclude=["big"]) == fingerprint(sd, exclude=["big"])
    rows = {**sd, "emb.placeholder_weight": torch.randn(2, 4), "model_ema.x": torch.ones(1)}
    assert fingerprint(rows) == ref  # placeholder rows and EMA copies are not the base
    # SD's largest tensors have more elements than float32 counts exactly (2**24).
    huge = torch.zeros(29_491_200, dtype=torch.bfloat16)
    assert fingerprint({"w": huge}) != fingerprint({"w": huge[:-1]})
