"""Delta formats: our deltas round-trip through the reference CompVis, adobe ``delta.bin`` and
diffusers formats; other tools' files (no header) import against a base; one-line CLI errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from custom.__main__ import main
from custom.compress import SVD_U, compress
from custom.delta import apply_delta, load_delta, save_delta
from custom.formats import DIFFUSERS_WEIGHTS, EMBED, ROWS, Delta, reference_tokens
from ldm import resolve_model_config
from ldm.checkpoint import UnsafeCheckpointError, load_pickle, save_pickle, save_state_dict
from ldm.convert import unet_compvis_to_diffusers
from tests.test_custom import INIT_IDS, TOKENS, custom_model, outputs, tiny_base, train_steps

SUFFIX = {"compvis": "delta.ckpt", "adobe": "delta.bin", "diffusers": "exported"}
UNET = resolve_model_config("tiny")["unet_config"]["params"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(tmp dir, base weights file, our delta file, the trained model)."""
    tmp = tmp_path_factory.mktemp("formats")
    base = tmp / "base.safetensors"
    save_state_dict(tiny_base(0).state_dict(), base)
    trained = train_steps(custom_model(modifier_tokens=TOKENS, initializer_ids=INIT_IDS), 2)
    return tmp, base, save_delta(trained, tmp / "delta.safetensors"), trained


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fmt", ["compvis", "adobe", "diffusers"])
def test_round_trip_through_each_format(files, fmt, tmp_path, capsys):
    _, _, delta, _ = files
    out, back = tmp_path / SUFFIX[fmt], tmp_path / "back.safetensors"
    assert main(["export", str(delta), "--format", fmt, "--config", "tiny", "-o", str(out)]) == 0
    assert main(["import", str(out), "--format", fmt, "--config", "tiny", "-o", str(back)]) == 0
    (t0, m0), (t1, m1) = load_delta(delta), load_delta(back)
    assert same(t0, t1) and m0 == m1  # our header travels with the file: no base needed


def test_compvis_layout_and_compressed_round_trip(files, tmp_path):
    _, _, delta, _ = files
    d = Delta.load(delta)
    obj = load_pickle(main_export(delta, "compvis", tmp_path / "d.ckpt"))
    assert set(obj["state_dict"]) == {k for k in d.tensors if k != ROWS} | {EMBED}
    assert torch.equal(obj["state_dict"][EMBED], d.tensors[ROWS])
    tensors, meta = compress(d.tensors, d.meta, tiny_base(0).state_dict())
    small = Delta(tensors, d.tokens, meta).save(tmp_path / "small.safetensors")
    obj = load_pickle(main_export(small, "compvis", tmp_path / "c.ckpt"))
    entry = next(v for k, v in obj["state_dict"].items() if k != EMBED)
    assert set(entry) == {"u", "v"}  # the reference's compressed_delta layout
    back = tmp_path / "back.safetensors"
    assert main(["import", str(tmp_path / "c.ckpt"), "--format", "compvis", "-o", str(back)]) == 0
    assert same(load_delta(back)[0], tensors) and load_delta(back)[1] == meta


def main_export_status(src, fmt, out, *extra) -> int:
    return main(["export", str(src), "--format", fmt, "--config", "tiny", "-o", str(out), *extra])


def main_export(src, fmt, out, *extra):
    assert main_export_status(src, fmt, out, *extra) == 0
    return out


def test_compressed_delta_exports_full_weights_for_diffusers(files, tmp_path):
    _, base, delta, _ = files
    d = Delta.load(delta)
    tensors, meta = compress(d.tensors, d.meta, tiny_base(0).state_dict(), rank=64)
    small = Delta(tensors, d.tokens, meta).save(tmp_path / "small.safetensors")
    # Expanding needs the base it was compressed against (tiny's own ckpt is null: random).
    assert main_export_status(small, "diffusers", tmp_path / "x") == 1
    out = main_export(small, "diffusers", tmp_path / "y", "--base", str(base))
    back = tmp_path / "back.safetensors"
    args = ["import", str(out), "--format", "diffusers", "--config", "tiny", "-o", str(back)]
    assert main(args) == 0
    full, _ = load_delta(back)
    assert not any(k.endswith(SVD_U) for k in full)
    assert all(torch.allclose(full[k], d.tensors[k], atol=1e-5) for k in d.tensors)


def reference_files(trained, folder):
    """What the other tools write: no header, tokens named by position (compvis) or by key."""
    sd = trained.export_state_dict()
    rows = sd.pop(ROWS)
    folder.mkdir()
    torch.save({"state_dict": {**sd, EMBED: rows}}, folder / "delta_epoch=000004.ckpt")
    unet = {k: v for k, v in unet_compvis_to_diffusers(
        {**tiny_base(0).state_dict(), **sd}, UNET).items() if ".attn2.to_" in k}  # fmt: skip
    unet = {k: v for k, v in unet.items() if ".to_k." in k or ".to_v." in k}
    names = reference_tokens(len(TOKENS))
    tokens = {t: rows[i] for i, t in enumerate(names)}
    torch.save({"unet": unet, "modifier_token": tokens}, folder / "delta.bin")
    hf = folder / "hf"
    hf.mkdir()
    procs = {k.replace(".attn2.to_k.", ".attn2.processor.to_k_custom_diffusion.")
              .replace(".attn2.to_v.", ".attn2.processor.to_v_custom_diffusion."): v
             for k, v in unet.items()}  # fmt: skip
    procs.update({k.split(".attn2.")[0] + ".attn1.processor": {} for k in unet})
    torch.save(procs, hf / f"{DIFFUSERS_WEIGHTS}.bin")
    for t, row in tokens.items():
        torch.save({t: row}, hf / f"{t}.bin")
    return {"compvis": folder / "delta_epoch=000004.ckpt", "adobe": folder / "delta.bin",
            "diffusers": hf}  # fmt: skip


@pytest.mark.parametrize("fmt", ["compvis", "adobe", "diffusers"])
def test_other_tools_files_import_against_the_base(files, fmt, tmp_path):
    _, base, _, trained = files
    src = reference_files(trained, tmp_path / "ref")[fmt]
    out = tmp_path / "imported.safetensors"
    common = ["--format", fmt, "--config", "tiny", "--base", str(base), "-o", str(out)]
    assert main(["import", str(src), *common]) == 0
    tensors, meta = load_delta(out)
    names = reference_tokens(len(TOKENS))
    assert json.loads(meta["tokens"]) == names and meta["freeze_model"] == "crossattn_kv"
    assert meta["imported_from"].startswith(fmt)
    model = tiny_base(0).eval()
    apply_delta(model, out)  # the recorded base is this base
    got = outputs(model, f"a photo of a {names[0]} triangle")
    want = outputs(trained, f"a photo of a {TOKENS[0]} triangle")
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    other = tmp_path / "other.safetensors"
    save_state_dict(tiny_base(1).state_dict(), other)
    renamed = ["--tokens", "<a1>", "<a2>", "--overwrite"]
    assert main(["import", str(src), *common, *renamed]) == 0
    assert json.loads(load_delta(out)[1]["tokens"]) == ["<a1>", "<a2>"]
    # with the file's header, the base must match
    back = ["-o", str(tmp_path / "x.safetensors"), "--config", "tiny"]
    assert main(["export", str(out), "--format", "compvis", "-o", str(tmp_path / "x.ckpt")]) == 0
    assert main(["import", str(tmp_path / "x.ckpt"), "--format", "compvis", *back]) == 0
    assert main(["import", str(tmp_path / "x.ckpt"), "--format", "compvis", *back,
                 "--overwrite", "--base", str(other)]) == 1  # fmt: skip


def test_pickles_load_safely_and_save_atomically(tmp_path):
    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    torch.save({"unet": {}, "x": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(UnsafeCheckpointError, match="code execution"):
        load_pickle(tmp_path / "evil.bin")
    assert not (tmp_path / "pwned").exists()
    nested = {"unet": {"a": torch.ones(2)}, "modifier_token": {"<t>": torch.zeros(3)}, "p": {}}
    save_pickle(nested, tmp_path / "ok.bin")
    back = load_pickle(tmp_path / "ok.bin")
    assert torch.equal(back["unet"]["a"], torch.ones(2)) and back["p"] == {}
    with pytest.raises(ValueError, match="suffix"):
        save_pickle(nested, tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError):
        load_pickle(tmp_path / "missing.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.bin", "ok.bin"]


def test_cli_errors_are_one_line(files, tmp_path, capsys):
    tmp, base, delta, _ = files
    capsys.readouterr()
    cases = [
        ["info", str(tmp_path / "missing.safetensors")],
        ["export", str(base), "--format", "compvis", "-o", str(tmp_path / "a.ckpt")],  # not a delta
        ["export", str(delta), "--format", "adobe", "-o", str(delta)],  # exists
        ["import", str(delta), "--format", "adobe", "--config", "tiny", "-o", str(tmp_path / "b")],
        ["compress", str(delta), "--base", str(tmp / "nope.ckpt"), "--config", "tiny",
         "-o", str(tmp_path / "c.safetensors")],
    ]  # fmt: skip
    for args in cases:
        assert main(args) == 1, args
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == len(cases) and all(line.startswith("error: ") for line in err), err
    assert main(["info", str(delta)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["metadata"]["tokens"] == json.dumps(TOKENS) and ROWS in info["tensors"]


def test_python_dash_m_custom(files):
    import subprocess
    import sys

    from tests.conftest import ROOT

    _, _, delta, _ = files
    proc = subprocess.run([sys.executable, "-m", "custom", "info", str(delta)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["metadata"]["method"] == "custom_diffusion"
