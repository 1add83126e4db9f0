"""Shared fixtures: the tiny random model and composed Hydra configs (nothing fetched)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from main import compose_config  # noqa: E402, F401  (tests import it from here)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
# SD v1.5's own config files (no weights), shipped with the tests; tokenizer: ldm/assets.
SD15_CONFIGS = ROOT / "tests" / "data" / "sd15_configs"
CLIP_TOKENIZER = ROOT / "ldm" / "assets" / "clip_tokenizer"


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
