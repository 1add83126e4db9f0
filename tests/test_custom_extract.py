"""Deltas extracted from full checkpoints: a real Lightning ``.ckpt`` (read without running
code), a reference-style full state dict with the token rows appended to the table; other
bases refused, other changed tensors reported."""

from __future__ import annotations

import json

import pytest
import torch

from custom.__main__ import main
from custom.delta import DeltaMismatchError, apply_delta, load_delta
from custom.extract import TABLE, extract, read_full_checkpoint
from custom.formats import ROWS
from ldm.checkpoint import save_state_dict
from tests.conftest import compose_config
from tests.test_custom import INIT_IDS, TOKENS, custom_model, outputs, recipe_overrides, tiny_base


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory):
    """A 2-step fine-tuning run that also wrote a full Lightning checkpoint."""
    from main import train

    tmp = tmp_path_factory.mktemp("extract")
    base = tmp / "base.safetensors"
    save_state_dict(tiny_base(0).state_dict(), base)
    extra = [
        "trainer.enable_checkpointing=true",
        "+callbacks.ckpt._target_=pytorch_lightning.callbacks.ModelCheckpoint",
        f"+callbacks.ckpt.dirpath={tmp / 'lightning'}",
        "+callbacks.ckpt.save_last=true",
    ]
    train(compose_config("finetune_noreg", recipe_overrides(tmp, base) + extra, tmp / "run"))
    return base, tmp / "lightning" / "last.ckpt", tmp / "run" / "checkpoints" / "last.safetensors"


def test_extract_from_a_lightning_checkpoint(lightning_run, tmp_path, capsys):
    base, ckpt, saved = lightning_run
    full, step = read_full_checkpoint(ckpt)
    assert step == 2 and ROWS in full  # a real Lightning file: optimizer and loop state too
    out = tmp_path / "delta.safetensors"
    args = ["extract", str(ckpt), "--base", str(base), "--config", "tiny", "-o", str(out)]
    assert main(args) == 0 and capsys.readouterr().out.strip() == str(out)
    (got, meta), (want, want_meta) = load_delta(out), load_delta(saved)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    for field in ("base_hash", "tokens", "step", "freeze_model", "method"):
        assert meta[field] == want_meta[field], field


def reference_full_state(trained):
    """The reference saves the whole model, the new rows appended to the token table."""
    sd = trained.state_dict()
    rows = sd.pop(ROWS)
    sd[TABLE] = torch.cat([sd[TABLE], rows])
    return sd


def test_extract_reference_style_full_state_dict(tmp_path):
    from tests.test_custom import train_steps

    trained = train_steps(custom_model(modifier_tokens=TOKENS, initializer_ids=INIT_IDS), 2)
    full = tmp_path / "full.safetensors"
    save_state_dict(reference_full_state(trained), full)
    base = tmp_path / "base.safetensors"
    save_state_dict(tiny_base(0).state_dict(), base)
    out = tmp_path / "delta.safetensors"
    args = ["extract", str(full), "--base", str(base), "--config", "tiny", "-o", str(out)]
    assert main([*args, "--tokens", *TOKENS]) == 0
    tensors, meta = load_delta(out)
    assert json.loads(meta["tokens"]) == TOKENS and meta["freeze_model"] == "crossattn_kv"
    assert len(tensors) == 15 and tensors[ROWS].shape == (2, 32)
    model = tiny_base(0).eval()
    apply_delta(model, out)
    prompt = f"a photo of a {TOKENS[0]} triangle and a {TOKENS[1]} circle"
    for got, want in zip(outputs(model, prompt), outputs(trained.eval(), prompt), strict=True):
        assert torch.equal(got, want)


def test_crossattn_is_detected_and_other_changes_reported(caplog):
    trained = custom_model(freeze_model="crossattn")
    sd = trained.state_dict()
    with torch.no_grad():
        for key in sd:
            if ".attn2." in key or key.endswith("out.2.weight"):
                sd[key] = sd[key] + 0.01
    base = tiny_base(0).eval()
    delta = extract(sd, base)
    assert delta.meta["freeze_model"] == "crossattn" and len(delta.tensors) == 7 * 5 + 1
    assert "1 other UNet tensors differ" in caplog.text
    assert len(extract(sd, base, "crossattn_kv").tensors) == 7 * 2 + 1


def test_checkpoint_of_another_base_is_refused(caplog):
    sd = custom_model().state_dict()
    other = tiny_base(1).eval()  # different VAE and text encoder too
    with pytest.raises(DeltaMismatchError, match="not fine-tuned from this base") as err:
        extract(sd, other)
    assert "\n" not in str(err.value)
    extract(sd, other, force=True)
    assert "extracting anyway" in caplog.text
    with pytest.raises(ValueError, match="no new token rows"):
        extract(tiny_base(0).state_dict(), tiny_base(0), tokens=["<x>"])
