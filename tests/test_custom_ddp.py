"""Two CPU processes (Lightning DDP over gloo) train the same delta as one process with the
same global batch: 2 x 2 vs 1 x 4 samples per step, the same effective lr (``scale_lr``
multiplies by batch x devices), DDP averaging the two halves' gradients.

For the comparison the randomness is tied to the samples, not to the process: one seeded data
order (each rank takes every other sample of the same global batch), and each sample's timestep
and noise drawn from a generator seeded by (step, sample index); latents are the posterior
means. The test model and dataset below are importable by the DDP processes (``_target_``).
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from custom.delta import load_delta
from custom.extract import TABLE
from custom.formats import ROWS
from custom.model import CustomDiffusion
from data.concept import concept_dataset
from data.datamodule import DataModule
from ldm.checkpoint import save_state_dict
from tests.conftest import ROOT, compose_config
from tests.test_custom import tiny_base

STEPS, N_IMAGES = 3, 8
INIT_IDS = [42170]  # the recipe's initializer_ids


class Indexed(torch.utils.data.Dataset):
    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[i], "index": i}


def indexed_concepts(**kwargs: Any) -> Indexed:
    return Indexed(concept_dataset(**kwargs))


class GlobalOrderDataModule(DataModule):
    """Shuffled by one seeded permutation of the whole dataset, each process taking every
    ``world_size``-th sample of it (what Lightning's injected sampler does in DDP), so a step's
    global batch is the same set of samples for any number of processes."""

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(self.train_set, world, rank, shuffle=True, seed=0)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler)


class SampleSeededCustomDiffusion(CustomDiffusion):
    """Timestep and noise of a sample depend only on (global step, dataset index)."""

    def on_train_batch_start(self, batch, batch_idx) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self._indices = [int(i) for i in batch["index"]]

    def get_first_stage_encoding(self, posterior, generator=None):
        return self.scale_factor * posterior.mode()

    def p_losses(self, x0, cond, t, noise=None, mask=None, weight=None):
        gens = [torch.Generator().manual_seed(10_000 * self.global_step + i) for i in self._indices]
        t = torch.stack([torch.randint(0, self.num_timesteps, (), generator=g) for g in gens])
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
        return super().p_losses(x0, cond, t.to(x0.device), noise.to(x0), mask, weight)


def overrides(tmp_path, base, batch_size: int) -> list[str]:
    here = "tests.test_custom_ddp"
    return [
        "model=tiny", f"model.ckpt={base}", f"model._target_={here}.SampleSeededCustomDiffusion",
        # plain SGD: Adam's first steps are ~lr x sign(g), which turns the last-bit differences
        # of two gradient reductions into full-size steps wherever |g| is near its eps
        "model.optimizer._target_=torch.optim.SGD", "~model.optimizer.betas",
        "~model.optimizer.eps", "model.learning_rate=1.0",
        f"data.train._target_={here}.indexed_concepts",
        f"data._target_={here}.GlobalOrderDataModule", f"data.batch_size={batch_size}",
        f"data.train.concepts.0.instance_data_dir={tmp_path / 'concept'}", "data.train.aug=false",
        "data.train.flip_p=0",
        "prepare=null", f"trainer.max_steps={STEPS}", "logger=null", "callbacks.log_samples=null",
    ]  # fmt: skip


def write_concept(folder, n=N_IMAGES) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_two_process_ddp_delta_equals_single_process(tmp_path):
    from main import train

    base = tmp_path / "base.safetensors"
    save_state_dict(tiny_base(0).state_dict(), base)
    write_concept(tmp_path / "concept")
    train(compose_config("finetune_noreg", overrides(tmp_path, base, 4), tmp_path / "single"))
    ddp = tmp_path / "ddp"
    cmd = [
        sys.executable, "main.py", "--config-name", "finetune_noreg",
        *overrides(tmp_path, base, 2), "trainer=ddp", "trainer.accelerator=cpu",
        "trainer.devices=2", f"hydra.run.dir={ddp}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    single, meta1 = load_delta(tmp_path / "single" / "checkpoints" / "last.safetensors")
    multi, meta2 = load_delta(ddp / "checkpoints" / "last.safetensors")
    assert meta1["step"] == meta2["step"] == str(STEPS) and set(single) == set(multi)
    start = tiny_base(0).state_dict()
    start[ROWS] = start[TABLE][INIT_IDS[0]]  # the token row's initialisation
    rel = {}
    for key in single:
        moved = float((single[key] - start[key]).norm())
        assert moved > 0, key
        rel[key] = float((single[key] - multi[key]).norm()) / moved
    # float32 reductions in a different order: measured 1.3e-6
    assert max(rel.values()) < 1e-4, rel
