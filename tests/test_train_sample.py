"""End to end on the tiny model: Hydra configs -> fit -> safetensors -> sample.py -> PNGs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, compose_config

FAST = ["model=tiny", "trainer.max_steps=2", "data.batch_size=2", "callbacks.log_samples.steps=2",
        "callbacks.log_samples.prompts=[a red circle]", "logger=null"]  # fmt: skip


def test_train_then_sample(tmp_path):
    import sample
    from ldm.checkpoint import load_state_dict
    from main import train

    cfg = compose_config("train", FAST, tmp_path / "run")
    metrics = train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.safetensors"
    assert ckpt.exists() and (tmp_path / "run" / "samples" / "final.png").exists()
    assert np.isfinite(metrics["train/loss"])
    assert any(k.startswith("model.diffusion_model.") for k in load_state_dict(ckpt))

    def run(out, seed):
        scfg = compose_config(
            "sample",
            [
                "model=tiny",
                f"ckpt={ckpt}",
                "n_samples=3",
                "batch_size=2",
                "sampler.steps=3",
                f"seed={seed}",
                "model.ckpt=null",
            ],
            out,
        )
        return sample.run(scfg)

    paths = run(tmp_path / "s1", 0)
    assert len(paths) == 3 and (tmp_path / "s1" / "grid.png").exists()
    again = run(tmp_path / "s2", 0)
    other = run(tmp_path / "s3", 7)
    a, b, c = (np.asarray(Image.open(p[0])) for p in (paths, again, other))
    assert a.shape == (32, 32, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_train_on_image_folder(tmp_path):
    from main import train

    folder = ROOT / "tests" / "data" / "dreambooth"  # photos plus licence files (skipped)
    overrides = [
        *FAST,
        "data=folder",
        f"data.train.root={folder}",
        "data.train.caption=a photo of a dog",
        "callbacks.log_samples=null",
    ]
    cfg = compose_config("train", overrides, tmp_path)
    assert np.isfinite(train(cfg)["train/loss"])


def test_folder_dataset_layouts(tmp_path):
    from data.datasets import CaptionedImages

    for i in range(2):
        Image.new("RGB", (40, 30), (i * 100, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "0.txt").write_text("a red thing")
    with pytest.raises(ValueError, match="no caption"):
        CaptionedImages(tmp_path, size=16)
    (tmp_path / "1.txt").write_text("a dark thing")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    ds = CaptionedImages(tmp_path, size=16, flip_p=0.0)
    assert len(ds) == 2 and ds[0]["caption"] == "a red thing"
    assert ds[0]["image"].shape == (16, 16, 3) and ds[0]["image"].min() >= -1
    (tmp_path / "images.txt").write_text("0.png\n1.png\n")
    (tmp_path / "caption.txt").write_text("first\nsecond\n")
    ref = CaptionedImages(tmp_path, size=16)
    assert [c for _, c in ref.items] == ["first", "second"]


def test_cli_main_and_sample(tmp_path):
    env_cmd = [sys.executable, "main.py", *FAST, f"hydra.run.dir={tmp_path}/train"]
    proc = subprocess.run(env_cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = tmp_path / "train" / "checkpoints" / "last.safetensors"
    assert ckpt.exists()
    cmd = [
        sys.executable,
        "sample.py",
        "model=tiny",
        f"ckpt={ckpt}",
        "n_samples=2",
        "sampler.steps=2",
        'prompt="a blue square"',
        f"hydra.run.dir={tmp_path}/sample",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "sample" / "grid.png").exists()
    assert len(list((tmp_path / "sample").glob("0000*.png"))) == 2


def test_sample_refuses_unsafe_checkpoint(tmp_path):
    import sample
    from ldm.checkpoint import UnsafeCheckpointError

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": Payload()}, bad)
    cfg = compose_config("sample", ["model=tiny", f"ckpt={bad}", "n_samples=1"], tmp_path / "o")
    with pytest.raises(UnsafeCheckpointError):
        sample.run(cfg)
