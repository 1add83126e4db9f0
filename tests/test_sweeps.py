"""Multirun sweeps: every job in its own folder and a summary table of final metrics."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from ldm.sweep import read_jobs, write_summary
from tests.conftest import ROOT


def fake_job(root, num, overrides, metrics):
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    if metrics is not None:
        OmegaConf.save(OmegaConf.create(metrics), job / "metrics.yaml")


def test_summary_table_from_job_folders(tmp_path):
    assert write_summary(tmp_path) is None
    for i, (lr, steps) in enumerate([("5e-6", 750), ("5e-6", 1500), ("1e-5", 750), ("1e-5", 1500)]):
        metrics = {"train/loss": 0.1 * (i + 1)} if i != 2 else None  # job 2 failed
        fake_job(tmp_path, i, [f"model.learning_rate={lr}", f"trainer.max_steps={steps}",
                               "model=tiny"], metrics)  # fmt: skip
    fake_job(tmp_path, 10, ["model.learning_rate=1e-4", "trainer.max_steps=1", "model=tiny"], {})
    jobs = read_jobs(tmp_path)
    assert [j["job"] for j in jobs] == ["0", "1", "2", "3", "10"]  # numeric order
    md = write_summary(tmp_path).read_text()
    rows = list(csv.reader((tmp_path / "summary.csv").read_text().splitlines()))
    assert rows[0] == ["job", "model.learning_rate", "trainer.max_steps", "model", "train/loss",
                       "status"]  # fmt: skip
    assert rows[1] == ["0", "5e-6", "750", "tiny", "0.1", "ok"]
    assert rows[3][-2:] == ["", "no metrics"]
    assert md.count("\n") == 2 + 5 and "| 3 | 1e-5 | 1500 | tiny | 0.4 | ok |" in md


@pytest.mark.slow
def test_multirun_four_jobs_and_summary(tmp_path):
    """The README's sweep, on the tiny model for 2 steps: 2 learning rates x 2 step counts."""
    cmd = [sys.executable, "main.py", "--config-name", "finetune_face", "-m",
           "model.learning_rate=5e-6,1e-5", "trainer.max_steps=1,2", "model=tiny",
           "data.batch_size=2", "prepare.class_images.n=4", "callbacks.log_samples=null",
           f"hydra.sweep.dir={tmp_path}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i in range(4):
        assert (tmp_path / str(i) / "checkpoints" / "last.safetensors").exists()
    rows = list(csv.reader((tmp_path / "summary.csv").read_text().splitlines()))
    assert rows[0][:3] == ["job", "model.learning_rate", "trainer.max_steps"]
    jobs = {(float(r[1]), int(r[2])) for r in rows[1:]}
    assert jobs == {(5e-6, 1), (5e-6, 2), (1e-5, 1), (1e-5, 2)}
    assert all(r[-1] == "ok" for r in rows[1:]) and "train/loss" in rows[0]
    assert (tmp_path / "summary.md").exists()
