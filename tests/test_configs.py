"""Every root config and group option composes; the small ones instantiate."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import ROOT, compose_config

ROOT_CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
MODELS = sorted(p.stem for p in (ROOT / "configs" / "model").glob("*.yaml"))


@pytest.mark.parametrize("name", ROOT_CONFIGS)
def test_root_configs_compose(name, tmp_path):
    cfg = compose_config(name, [], tmp_path)
    assert cfg.paths.output_dir == str(tmp_path)


@pytest.mark.parametrize("model", MODELS)
def test_model_configs_instantiate(model, tmp_path):
    cfg = compose_config("train", [f"model={model}", "model.ckpt=null"], tmp_path)
    with torch.device("meta"):  # shapes only: the full-size model costs no memory here
        instance = instantiate(cfg.model)
    assert instance.num_timesteps == 1000
    assert instance.model.diffusion_model.model_channels > 0


def test_model_config_defaults_merge_the_same_in_hydra_and_load_model(tmp_path):
    from omegaconf import OmegaConf

    from ldm import resolve_model_config

    hydra = OmegaConf.to_container(compose_config("train", ["model=toy64"], tmp_path).model)
    plain = resolve_model_config("toy64")
    toy = resolve_model_config("toy")
    assert plain["image_size"] == hydra["image_size"] == 16
    assert plain["ckpt"] == hydra["ckpt"] == "models/toy64/toy64_base.safetensors"
    assert {k for k in toy if toy[k] != plain[k]} == {"image_size", "ckpt"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults:\n  - _self_\n  - toy\nimage_size: 4\n")
    with pytest.raises(ValueError, match="defaults"):
        resolve_model_config(bad)


def test_trainer_and_data_instantiate(tmp_path):
    cfg = compose_config(
        "train", ["model=tiny", "trainer=ddp", "trainer.accelerator=cpu"], tmp_path
    )
    assert cfg.trainer.strategy == "ddp"
    dm = instantiate(compose_config("train", ["model=tiny"], tmp_path).data)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[1:] == (32, 32, 3) and len(batch["caption"]) == dm.batch_size


@pytest.mark.slow
def test_ddp_two_processes_cpu(tmp_path):
    cmd = [
        sys.executable,
        "main.py",
        "model=tiny",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_steps=2",
        "data.batch_size=2",
        "logger=null",
        "callbacks.log_samples=null",
        f"hydra.run.dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "checkpoints" / "last.safetensors").exists()


@pytest.mark.slow
def test_multirun_sweep(tmp_path):
    cmd = [
        sys.executable,
        "main.py",
        "-m",
        "model=tiny",
        "trainer.max_steps=1,2",
        "data.batch_size=2",
        "callbacks.log_samples=null",
        f"hydra.sweep.dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for job in ("0", "1"):
        assert (tmp_path / job / "checkpoints" / "last.safetensors").exists()
