"""ViCo learns in the toy world (slow): a reduced ``bench/toy_vico.py`` run."""

from __future__ import annotations

import pytest

from bench._util import run_child
from tests.conftest import ROOT


@pytest.mark.slow
def test_reference_image_puts_the_novel_concept_in_the_samples(tmp_path):
    """One concept and 16 samples instead of 64 (about 6 minutes on one thread); the recipe's
    600 steps are needed (400 gave 0.44)."""
    out = run_child(
        ROOT / "bench" / "toy_vico.py",
        ["--samples", "16", "--threads", "1", "--timing-batch", "2", "--out", str(tmp_path)],
    )
    assert out["concept_rate"] >= 0.75, out
    assert out["base_rate"] <= 0.1 and out["token_only_rate"] <= 0.3, out
    assert out["step_cost_ratio"] > 1.0
    assert (tmp_path / "twotone_square_grid.png").exists()
