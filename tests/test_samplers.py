"""Tests for ldm.models.diffusion samplers (DDIM, PLMS, DDPM-ancestral).

* DDIM / DDPM: step-for-step parity with diffusers' schedulers (a test-only
  dependency) on a deterministic fake eps model with the SD v1 schedule.
* All three: on 1-D Gaussian data N(MU, SIG^2), where the exact eps is known in
  closed form, samples land on the right distribution; DDIM/PLMS are compared
  per sample with the exact probability-flow ODE solution.
* Guidance, seeding, step hooks and callbacks. Everything is tiny and CPU-only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

from ldm.models.diffusion.ancestral import AncestralSampler
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.sampling import Sampler, guided_eps, leading_timesteps, make_sampler
from tests.conftest import SD15_CONFIGS

diffusers = pytest.importorskip("diffusers")

SCHEDULER_CONFIG = SD15_CONFIGS / "scheduler" / "scheduler_config.json"
SHAPE = (4, 8, 8)  # latent (C, H, W)
MU, SIG = 1.5, 0.5  # 1-D Gaussian data distribution


class FakeLDM(torch.nn.Module):
    """SD v1 noise schedule + a deterministic, nonlinear, cond-dependent eps model."""

    def __init__(self) -> None:
        super().__init__()
        self.num_timesteps = 1000
        # SD v1 "scaled linear" betas in float64, stored as float32 (as ddpm.py does).
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("betas", betas.float())
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())
        self.calls: list[tuple[Tensor, Tensor, Tensor]] = []  # (x, t, cond) per call

    def apply_model(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        self.calls.append((x.clone(), t.clone(), cond.clone()))
        tt = (t.float() / 1000).view(-1, 1, 1, 1)
        bias = cond.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return torch.tanh(0.8 * x + bias) * (0.5 + tt) + 0.3 * torch.sin(3 * x * tt)


class GaussianLDM(FakeLDM):
    """Exact eps for data N(MU, SIG^2), whose x_t ~ N(sqrt(a) MU, a SIG^2 + 1 - a)."""

    def apply_model(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        a = self.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * (x.double() - a.sqrt() * MU) / (a * SIG**2 + 1 - a)
        return eps.to(x.dtype)


def sd_config() -> dict[str, Any]:
    """SD v1.5's own scheduler_config.json."""
    return json.loads(SCHEDULER_CONFIG.read_text())


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny tensors: on shared CPUs intra-op threads only add contention (100x slower ops).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def diffusers_ddim(steps: int) -> Any:
    sched = diffusers.DDIMScheduler.from_config(
        sd_config(), steps_offset=1, set_alpha_to_one=False, clip_sample=False
    )
    sched.set_timesteps(steps)
    return sched


def diffusers_ddpm(steps: int, steps_offset: int) -> Any:
    sched = diffusers.DDPMScheduler.from_config(
        sd_config(), steps_offset=steps_offset, variance_type="fixed_small", clip_sample=False
    )
    assert sched.config.timestep_spacing == "leading"
    sched.set_timesteps(steps)
    return sched


def rel_err(a: Tensor, b: Tensor) -> float:
    """max |a - b| relative to the scale max |b| of the reference."""
    return ((a - b).abs().max() / b.abs().max()).item()


def conds(batch: int = 2) -> tuple[Tensor, Tensor]:
    """(cond, uncond), each (batch, 3, 5)."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 5, generator=g), torch.randn(batch, 3, 5, generator=g) * 0.1


def randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def run(
    sampler: Sampler, cond: Tensor, seed: int | None = 0, keep: bool = True, **kw: Any
) -> tuple[Tensor, list]:
    """Sample without a progress bar; returns (z0, [(x, x0_pred) after each step if keep])."""
    traj: list = []
    if "x_T" not in kw:
        kw["shape"] = SHAPE
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    cb = (lambda i, x, x0: traj.append((x.clone(), x0.clone()))) if keep else None
    return sampler.sample(cond, generator=gen, callback=cb, progress=False, **kw), traj


@pytest.mark.parametrize("steps", [10, 50, 1000])
def test_timesteps_match_diffusers(steps: int) -> None:
    ddpm = AncestralSampler(FakeLDM()).timesteps(steps)
    assert torch.equal(ddpm, diffusers_ddpm(steps, 0).timesteps)
    if steps == 1000:
        assert ddpm.tolist() == list(range(999, -1, -1))  # plain DDPM
        with pytest.raises(ValueError):  # t = 1000 does not exist
            leading_timesteps(1000, 1000, steps_offset=1)
        return
    ddim = DDIMSampler(FakeLDM()).timesteps(steps)
    assert torch.equal(ddim, diffusers_ddim(steps).timesteps)
    assert torch.equal(PLMSSampler(FakeLDM()).timesteps(steps), ddim)


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("same_alphas", [False, True])
def test_ddim_single_step_matches_diffusers(eta: float, same_alphas: bool) -> None:
    model = FakeLDM()
    sampler = DDIMSampler(model)
    schedule, sched = sampler.make_schedule(50, eta=eta), diffusers_ddim(50)
    if same_alphas:  # isolate the step formula from diffusers' float32 schedule rounding
        sched.alphas_cumprod = model.alphas_cumprod.clone()
        sched.final_alpha_cumprod = model.alphas_cumprod[0]
    g = torch.Generator().manual_seed(3)
    for i, t in enumerate(sched.timesteps):
        x = torch.randn(2, *SHAPE, generator=g)
        eps = model.apply_model(x, t.expand(2), conds()[0])
        noise = torch.randn(2, *SHAPE, generator=g) if eta > 0 else None
        ref_x, ref_x0 = sched.step(eps, t, x, eta=eta, variance_noise=noise, return_dict=False)
        x_prev, x0 = sampler.ddim_step(x, eps, i, schedule, noise)
        # Measured: abs <= 4.8e-7 with the same alphas; rel <= 3.0e-7 with diffusers' own.
        err = (x_prev - ref_x).abs().max() if same_alphas else rel_err(x_prev, ref_x)
        assert err < 1e-6
        assert rel_err(x0, ref_x0) < 1e-6


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_trajectory_matches_diffusers(eta: float) -> None:
    model = FakeLDM()
    cond, uncond = conds()
    _, ours = run(DDIMSampler(model), cond, uncond=uncond, steps=50, eta=eta)
    # Same seed: x_T first, then one noise draw per step (the documented order).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *SHAPE, generator=g)
    sched = diffusers_ddim(50)
    for i, ((x_ours, x0_ours), t) in enumerate(zip(ours, sched.timesteps, strict=True)):
        eps_u, eps_c = (model.apply_model(x, t.expand(2), c) for c in (uncond, cond))
        noise = torch.randn(x.shape, generator=g) if eta > 0 else None
        out = sched.step(eps_u + 7.5 * (eps_c - eps_u), t, x, eta=eta, variance_noise=noise)
        x = out.prev_sample
        assert rel_err(x_ours, x) < 1e-5, f"step {i}"  # measured <= 1.9e-6
        assert rel_err(x0_ours, out.pred_original_sample) < 1e-5, f"step {i}"


@pytest.mark.parametrize(
    ("steps", "offset", "tol"), [(50, 0, 1e-5), (50, 1, 1e-5), (1000, 0, 5e-5)]
)
def test_ancestral_trajectory_matches_diffusers(steps: int, offset: int, tol: float) -> None:
    model = FakeLDM()
    cond, x_T = conds()[0], randn(2, *SHAPE, seed=5)
    sampler = make_sampler("ddpm", model, steps_offset=offset)
    _, ours = run(sampler, cond, steps=steps, x_T=x_T)
    sched = diffusers_ddpm(steps, offset)
    g, x = torch.Generator().manual_seed(0), x_T  # diffusers draws its noise from g
    for i, ((x_ours, x0_ours), t) in enumerate(zip(ours, sched.timesteps, strict=True)):
        out = sched.step(model.apply_model(x, t.expand(2), cond), t, x, generator=g)
        x = out.prev_sample
        assert rel_err(x_ours, x) < tol, f"step {i}"
        assert rel_err(x0_ours, out.pred_original_sample) < tol, f"step {i}"
    if steps == 1000:
        # Over 1000 steps diffusers' float32 coefficients (1 - a_t / a_prev cancels) drift
        # ~2e-5 from us; we stay within 1e-5 of the same chain run in float64.
        _, exact = run(sampler, cond.double(), steps=steps, x_T=x_T.double())
        assert max(rel_err(a[0].double(), b[0]) for a, b in zip(ours, exact, strict=True)) < 1e-5


def test_ancestral_equals_ddim_eta_one() -> None:
    # Algebraically DDPM's posterior step is DDIM with eta = 1; on the same grid and noise
    # they agree on every step but the last (DDPM lands on abar = 1, DDIM on abar[0]).
    cond, uncond = conds()
    kw: dict[str, Any] = dict(uncond=uncond, steps=20, x_T=randn(2, *SHAPE, seed=9))
    _, ddpm = run(AncestralSampler(FakeLDM(), steps_offset=1), cond, **kw)
    _, ddim = run(DDIMSampler(FakeLDM()), cond, eta=1.0, **kw)
    for (a, _), (b, _) in zip(ddpm[:-1], ddim[:-1], strict=True):
        assert rel_err(a, b) < 1e-5


def run_gaussian(name: str, steps: int, n: int, keep: bool = False) -> tuple[Tensor, Tensor, list]:
    """Sample from x_T ~ exact marginal at the first step: (z0 (n,1,1,1) f64, z-score, traj)."""
    model = GaussianLDM()
    sampler = make_sampler(name, model)
    a = model.alphas_cumprod.double()[sampler.timesteps(steps)[0]]
    z = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_T = (a.sqrt() * MU + (a * SIG**2 + 1 - a).sqrt() * z).float()
    out, traj = run(sampler, torch.zeros(n, 1, 1), 1, keep, steps=steps, x_T=x_T, guidance_scale=1)
    return out.double(), z, traj


def final_marginal() -> tuple[float, float]:
    """DDIM/PLMS stop at level abar[0] (set_alpha_to_one=False), not at clean data."""
    a0 = GaussianLDM().alphas_cumprod.double()[0].item()
    return math.sqrt(a0) * MU, math.sqrt(a0 * SIG**2 + 1 - a0)


def test_deterministic_samplers_follow_exact_ode() -> None:
    # The probability-flow ODE maps x_T to the point with the same z-score at abar[0].
    mean, std = final_marginal()  # (1.4994, 0.5006)
    errs = {}
    for name in ("ddim", "plms"):
        for steps in (25, 50):
            out, z, _ = run_gaussian(name, steps, n=20000)
            errs[name, steps] = (out - (mean + std * z)).abs().max().item()
        # Sample statistics at 50 steps (measured mean 1.4937 / 1.4934, std 0.4797 / 0.5016).
        assert abs(out.mean().item() - mean) < 0.01
        assert abs(out.std().item() - std) < (0.03 if name == "ddim" else 0.01)
    # Measured: DDIM 0.18 / 0.095 (1st order), PLMS 0.021 / 0.0055 (higher order).
    assert errs["ddim", 50] < 0.15
    assert 1.6 < errs["ddim", 25] / errs["ddim", 50] < 2.5
    assert errs["plms", 50] < 0.01
    assert errs["plms", 25] / errs["plms", 50] > 3.0
    assert errs["plms", 50] < errs["ddim", 50] / 10


def ancestral_moments(ts: list[int]) -> tuple[float, float]:
    """Exact mean/std after the respaced ancestral chain on Gaussian data (affine recursion)."""
    levels = [GaussianLDM().alphas_cumprod.double()[t].item() for t in ts] + [1.0]
    mean, var = math.sqrt(levels[0]) * MU, levels[0] * SIG**2 + 1 - levels[0]
    for a, ap in zip(levels[:-1], levels[1:], strict=True):
        k = math.sqrt(1 - a) / (a * SIG**2 + 1 - a)  # eps = k * (x - sqrt(a) MU)
        p, q = (1 - math.sqrt(1 - a) * k) / math.sqrt(a), math.sqrt(1 - a) * k * MU  # x0 = p x + q
        beta = 1 - a / ap
        c0, ct = math.sqrt(ap) * beta / (1 - a), math.sqrt(1 - beta) * (1 - ap) / (1 - a)
        mean = (c0 * p + ct) * mean + c0 * q
        var = (c0 * p + ct) ** 2 * var + (1 - ap) / (1 - a) * beta
    return mean, math.sqrt(var)


@pytest.mark.parametrize("steps", [50, 1000])
def test_ancestral_hits_data_distribution(steps: int) -> None:
    out, _, _ = run_gaussian("ddpm", steps, n := 20000)
    mean, std = out.mean().item(), out.std().item()
    exp_mean, exp_std = ancestral_moments(AncestralSampler(FakeLDM()).timesteps(steps).tolist())
    # Against the chain's exact moments: 4 standard errors.
    assert abs(mean - exp_mean) < 4 * exp_std / math.sqrt(n)
    assert abs(std - exp_std) < 4 * exp_std / math.sqrt(2 * n)
    # Against the data: fixed-small variance under-disperses with few steps (0.451 at 50).
    assert abs(mean - MU) < 0.02
    assert abs(std - SIG) < (0.06 if steps == 50 else 0.01)


def test_plms_close_to_ddim_and_converging() -> None:
    diffs = []
    for steps in (25, 50):
        ddim, plms = (run_gaussian(name, steps, 1024, keep=True)[2] for name in ("ddim", "plms"))
        diffs.append(max((a[0] - b[0]).abs().max().item() for a, b in zip(ddim, plms, strict=True)))
    assert diffs[1] < 0.15  # measured 0.089
    assert diffs[0] / diffs[1] > 1.6  # both converge to the same ODE


def test_guided_eps_formula_and_single_batched_call() -> None:
    model = FakeLDM()
    cond, uncond = conds()
    x, t = randn(2, *SHAPE, seed=2), torch.full((2,), 500)
    eps = guided_eps(model, x, t, cond, uncond, 5.0)
    assert len(model.calls) == 1
    x_in, t_in, c_in = model.calls[0]
    assert torch.equal(c_in, torch.cat([uncond, cond]))  # (2B, L, D), uncond first
    assert torch.equal(x_in, torch.cat([x, x])) and torch.equal(t_in, torch.cat([t, t]))
    eps_u, eps_c = model.apply_model(x, t, uncond), model.apply_model(x, t, cond)
    torch.testing.assert_close(eps, eps_u + 5.0 * (eps_c - eps_u), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["ddim", "plms", "ddpm"])
def test_guidance_batching(name: str) -> None:
    cond, uncond = conds()
    sampler = make_sampler(name, model := FakeLDM())
    run(sampler, cond, uncond=uncond, steps=10)
    ts = sampler.timesteps(10).tolist()
    # One (2B) call per step; PLMS adds its improved-Euler corrector at the next timestep.
    assert [int(c[1][0]) for c in model.calls[:3]] == [ts[0], ts[1], ts[1 if name == "plms" else 2]]
    assert len(model.calls) == 10 + (name == "plms")
    assert all(x.shape[0] == 4 and c.shape[0] == 4 for x, _, c in model.calls)
    # guidance 1 == cond only, and then the model sees only the B conditional rows.
    outs = []
    for unc in (uncond, None):
        model = FakeLDM()
        outs.append(run(make_sampler(name, model), cond, uncond=unc, guidance_scale=1, steps=8)[0])
        assert all(x.shape[0] == 2 for x, _, _ in model.calls)
    assert torch.equal(outs[0], outs[1])
    # A batch-1 uncond (one negative prompt) broadcasts over the batch.
    one = run(make_sampler(name, FakeLDM()), cond, uncond=uncond[:1], steps=3)[0]
    two = run(make_sampler(name, FakeLDM()), cond, uncond=uncond[:1].expand(2, 3, 5), steps=3)[0]
    assert torch.equal(one, two)


@pytest.mark.parametrize(("name", "kw"), [("ddim", {"eta": 0.5}), ("ddpm", {}), ("plms", {})])
def test_seed_reproducibility(name: str, kw: dict[str, Any]) -> None:
    cond, uncond = conds()

    def go(seed: int) -> Tensor:
        return run(make_sampler(name, FakeLDM()), cond, seed, uncond=uncond, steps=10, **kw)[0]

    assert torch.equal(go(123), go(123))
    assert not torch.allclose(go(123), go(124))
    # x_T is the generator's first draw; the step noise follows from the same stream.
    g = torch.Generator().manual_seed(123)
    x_T = torch.randn(2, *SHAPE, generator=g)
    again = make_sampler(name, FakeLDM()).sample(
        cond, uncond=uncond, steps=10, x_T=x_T, generator=g, progress=False, **kw
    )
    assert torch.equal(again, go(123))


def test_step_hooks_called_per_step_with_info() -> None:
    model = FakeLDM()
    cond, uncond = conds()
    seen: list[tuple[int, int, bool]] = []

    def hook(x: Tensor, t: Tensor, info: dict[str, Any]) -> Tensor:
        assert (info["num_steps"], info["model"], info["guidance_scale"]) == (10, model, 7.5)
        assert info["cond"] is not None and info["uncond"] is not None
        seen.append((info["i"], int(t[0]), torch.is_grad_enabled()))
        return x

    sampler = make_sampler("ddim", model)
    _, traj = run(sampler, cond, uncond=uncond, steps=10, step_hooks=[hook])
    assert [i for i, _, _ in seen] == list(range(10)) and len(traj) == 10
    assert [t for _, t, _ in seen] == sampler.timesteps(10).tolist()
    assert all(grad for _, _, grad in seen)  # the sampler does not disable autograd for hooks


def test_step_hook_gradients_and_returned_latent_is_used() -> None:
    model = FakeLDM()
    cond, uncond = conds()
    x_T = randn(2, *SHAPE, seed=6)

    def nudge(x: Tensor, t: Tensor, info: dict[str, Any]) -> Tensor:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(xg.sin().sum(), xg)
        torch.testing.assert_close(grad, x.cos())
        return x - 0.05 * grad

    sampler = DDIMSampler(model)
    with torch.no_grad():  # even when the caller disables grad, enable_grad in the hook works
        out, _ = run(sampler, cond, uncond=uncond, steps=6, x_T=x_T, step_hooks=[nudge])
    # Hand-rolled loop applying the same nudge before each DDIM step.
    schedule, x = sampler.make_schedule(6), x_T
    for i, t in enumerate(schedule.timesteps):
        x = x - 0.05 * x.cos()
        eps = guided_eps(model, x, torch.full((2,), t), cond, uncond, 7.5)
        x, _ = DDIMSampler.ddim_step(x, eps, i, schedule)
    torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6)

    # Replacing the latent at step 0 is the same as starting there.
    x_alt = randn(2, *SHAPE, seed=7)
    swap = lambda x, t, info: x_alt if info["i"] == 0 else x  # noqa: E731
    swapped, _ = run(sampler, cond, uncond=uncond, steps=6, x_T=x_T, step_hooks=[swap])
    assert torch.equal(swapped, run(sampler, cond, uncond=uncond, steps=6, x_T=x_alt)[0])
    with pytest.raises(TypeError):
        run(sampler, cond, steps=2, step_hooks=[lambda x, t, info: None])


def test_make_sampler_names_and_options() -> None:
    model = FakeLDM()
    classes = {"DDIM": DDIMSampler, "plms": PLMSSampler, "ddpm": AncestralSampler}
    for name, cls in {**classes, "ancestral": AncestralSampler}.items():
        assert type(make_sampler(name, model)) is cls
    with pytest.raises(ValueError):
        make_sampler("euler", model)
    with pytest.raises(TypeError):
        run(make_sampler("ddim", model), conds()[0], steps=2, etaa=0.5)
    with pytest.raises(ValueError):  # PLMS is deterministic
        run(make_sampler("plms", model), conds()[0], steps=2, eta=0.5)
    # configs/sampler/ddpm.yaml passes eta: 0.0; ancestral sampling accepts and ignores it.
    a, _ = run(make_sampler("ddpm", model), conds()[0], steps=3, eta=0.0)
    assert torch.equal(a, run(make_sampler("ddpm", model), conds()[0], steps=3)[0])
