"""ViCo learns in the toy world (slow): a reduced ``bench/toy_vico.py`` run."""

from __future__ import annotations

import pytest

from bench._util import run_child
from tests.conftest import ROOT


@pytest.mark.slow
def test_reference_image_puts_the_novel_concept_in_the_samples(tmp_path):
    """400 steps instead of 600 and 16 samples instead of 64 (about 4 minutes on one thread)."""
    out = run_child(
        ROOT / "bench" / "toy_vico.py",
        ["--steps", "400", "--samples", "16", "--threads", "1", "--timing-batch", "2",
         "--out", str(tmp_path)],
    )  # fmt: skip
    assert out["concept_rate"] >= 0.6, out
    assert out["base_rate"] <= 0.1 and out["token_only_rate"] <= 0.3, out
    assert out["step_cost_ratio"] > 1.0
    assert (tmp_path / "twotone_square_grid.png").exists()
