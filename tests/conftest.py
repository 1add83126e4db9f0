"""Shared fixtures: the tiny random model and composed Hydra configs (nothing fetched)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def tiny_ldm():
    from ldm import build_model

    torch.manual_seed(0)
    return build_model("tiny").eval()


@pytest.fixture()
def tiny_model():
    """A fresh tiny model a test may modify."""
    from ldm import build_model

    torch.manual_seed(0)
    return build_model("tiny")


def compose_config(name: str, overrides: list[str], output_dir: Path):
    """Compose a root config as Hydra would, with its runtime values set."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(output_dir)
    cfg.hydra.runtime.cwd = str(ROOT)
    HydraConfig.instance().set_config(cfg)
    return cfg
