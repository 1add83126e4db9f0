"""A crash loses no saved delta, and a run resumes from its last delta (``+resume=PATH|auto``)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from custom.delta import DeltaMismatchError, load_delta
from custom.resume import newest_delta
from ldm.checkpoint import save_state_dict
from tests.conftest import compose_config
from tests.test_custom import recipe_overrides, tiny_base

CRASH = "tests.test_custom_resume.CrashAt"
COUNT = "tests.test_custom_resume.CountSteps"


class CrashAt(pl.Callback):
    """Raises after optimizer step ``step`` (and the SaveWeights callback's save of it)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


class CountSteps(pl.Callback):
    """Records the global step and a K/V weight at the start of every batch."""

    seen: list[tuple[int, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        w = next(p for n, p in pl_module.named_parameters() if n.endswith("attn2.to_k.weight"))
        CountSteps.seen.append((trainer.global_step, w.detach().clone()))


@pytest.fixture()
def base(tmp_path):
    path = tmp_path / "base.safetensors"
    save_state_dict(tiny_base(0).state_dict(), path)
    return path


def seen() -> list:
    """What the CountSteps that Hydra built saw: Hydra imports this file as
    ``tests.test_custom_resume``, which pytest's own import of it is not."""
    import tests.test_custom_resume as hydra_side

    return hydra_side.CountSteps.seen


def run(tmp_path, base, *extra):
    from main import train

    overrides = recipe_overrides(tmp_path, base) + [
        "trainer.max_steps=4",
        "callbacks.save_weights.every_n_steps=2",
        f"+callbacks.count._target_={COUNT}",
        *extra,
    ]
    seen().clear()
    train(compose_config("finetune_noreg", overrides, tmp_path / "run"))
    return tmp_path / "run" / "checkpoints"


def test_crash_keeps_deltas_and_auto_resume_continues(tmp_path, base):
    crash = [f"+callbacks.crash._target_={CRASH}", "+callbacks.crash.step=3"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path, base, *crash)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000002.safetensors"]  # no temp files
    saved, meta = load_delta(ckpts / "step_000002.safetensors")
    assert meta["step"] == "2" and newest_delta(ckpts) == ckpts / "step_000002.safetensors"

    run(tmp_path, base, "+resume=auto")
    steps = [s for s, _ in seen()]
    assert steps == [2, 3]  # two more steps, numbered on from the delta's
    key = next(k for k in saved if k.endswith("attn2.to_k.weight"))
    assert torch.equal(seen()[0][1], saved[key])  # started from the saved weights
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == ["last.safetensors", "step_000002.safetensors", "step_000004.safetensors"]
    assert load_delta(ckpts / "last.safetensors")[1]["step"] == "4"
    assert newest_delta(ckpts).name in ("last.safetensors", "step_000004.safetensors")

    run(tmp_path, base, "+resume=auto")  # already done: no step is trained
    assert seen() == []


def test_resume_from_path_and_from_nothing(tmp_path, base):
    first = run(tmp_path / "a", base)
    assert [s for s, _ in seen()] == [0, 1, 2, 3]
    run(tmp_path / "b", base, f"+resume={first / 'step_000002.safetensors'}")
    assert [s for s, _ in seen()] == [2, 3]
    run(tmp_path / "c", base, "+resume=auto")  # an empty run folder: from scratch
    assert [s for s, _ in seen()] == [0, 1, 2, 3]


def test_resume_refuses_a_delta_of_another_base(tmp_path, base):
    first = run(tmp_path / "a", base)
    other = tmp_path / "other.safetensors"
    save_state_dict(tiny_base(1).state_dict(), other)
    with pytest.raises(DeltaMismatchError, match="trained on base") as err:
        run(tmp_path / "b", other, f"+resume={first / 'last.safetensors'}")
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="no delta at"):
        run(tmp_path / "c", base, f"+resume={tmp_path / 'missing.safetensors'}")
