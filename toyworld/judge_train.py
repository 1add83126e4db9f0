"""Training data, degradations, training loop and validation of the toy-world judge.

Every batch is freshly rendered: item ``i`` of a stream comes from
``numpy.random.default_rng([key, seed, i])``, with different keys for training and validation, so
validation images are never trained on. Scenes mix the pretraining distribution (1-4 objects,
patterns) with concept scenes: the concept or one of its near misses, alone or next to one other
object. Degradations (down-up resampling, Gaussian blur, colour jitter, blotchy and white noise)
keep the judge right on blurry model samples. No flips: a flip would swap a twotone object's main
colour.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from toyworld.concepts import CONCEPTS, near_misses
from toyworld.judge import (
    CONCEPT_NAMES,
    HEADS,
    OBJECT_LABELS,
    PATTERN_LABELS,
    Judge,
    evaluate_judge,
)
from toyworld.sampler import place, sample_combo, sample_scene
from toyworld.world import ObjectSpec, Scene, render, sample_background

log = logging.getLogger(__name__)

TRAIN_KEY, VAL_KEY = 71_001, 71_002  # rng stream keys: disjoint train / validation images
_NEAR_MISSES = {name: near_misses(name) for name in CONCEPTS}


def concept_scene(rng: np.random.Generator, name: str, positive: bool) -> Scene:
    """The concept (or a random near miss of it), alone or beside one random object."""
    combo = CONCEPTS[name].combo
    if not positive:
        misses = _NEAR_MISSES[name]
        combo = misses[int(rng.integers(len(misses)))]
    if rng.random() < 0.6:
        size = float(rng.uniform(0.36, 0.72))
        (pos,) = place(rng, [size]) or [(0.5, 0.5)]
        return Scene((ObjectSpec(*combo, size=size, position=pos),), sample_background(rng))
    other = sample_combo(rng, rng.random() < 0.3, avoid_labels={(combo[1], combo[0])})
    sizes = [float(rng.uniform(0.36, 0.46)), float(rng.uniform(0.26, 0.44))]
    positions = place(rng, sizes)
    while positions is None:
        sizes = [s * 0.95 for s in sizes]
        positions = place(rng, sizes)
    objects = tuple(
        ObjectSpec(*c, size=s, position=p)
        for c, s, p in zip((combo, other), sizes, positions, strict=True)
    )
    order = rng.permutation(2)  # draw order must not tell the concept apart
    return Scene(tuple(objects[i] for i in order), sample_background(rng))


def judge_scene(rng: np.random.Generator) -> Scene:
    """One training/validation scene for the judge (see module docstring for the mix)."""
    u = rng.random()
    if u < 0.3:
        name = CONCEPT_NAMES[int(rng.integers(len(CONCEPT_NAMES)))]
        return concept_scene(rng, name, positive=u < 0.15)
    return sample_scene(rng, mix={"one": 0.35, "two": 0.4, "many": 0.25}, pattern_prob=0.4)


def targets(objects: tuple[ObjectSpec, ...]) -> torch.Tensor:
    """Multi-hot (sum(HEADS),) target: objects, then concepts, then patterns."""
    y = torch.zeros(sum(HEADS.values()))
    n_obj, n_con = HEADS["objects"], HEADS["concepts"]
    combos = {o.combo for o in objects}
    for o in objects:
        y[OBJECT_LABELS.index(o.label)] = 1
        if o.pattern != "plain":
            y[n_obj + n_con + PATTERN_LABELS.index(o.pattern)] = 1
    for j, name in enumerate(CONCEPT_NAMES):
        y[n_obj + j] = float(CONCEPTS[name].combo in combos)
    return y


def images_to_tensor(images: list) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) float in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def make_batch(
    key: int, seed: int, start: int, n: int, size: int = 32
) -> tuple[torch.Tensor, torch.Tensor, list[Scene]]:
    """Items ``start .. start+n`` of a judge stream: images, targets, scenes."""
    scenes = [judge_scene(np.random.default_rng([key, seed, i])) for i in range(start, start + n)]
    x = images_to_tensor([render(s, size) for s in scenes])
    y = torch.stack([targets(s.objects) for s in scenes])
    return x, y, scenes


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample separable Gaussian blur; ``sigma`` (B,), 0 keeps the image."""
    b, c, h, w = x.shape
    t = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))  # (B, 5)
    k = k / k.sum(1, keepdim=True)
    k = k.repeat_interleave(c, 0)  # (B*C, 5)
    y = F.pad(x.reshape(1, b * c, h, w), (2, 2, 2, 2), mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def degrade(x: torch.Tensor, g: torch.Generator, p: float = 0.75) -> torch.Tensor:
    """Random mild degradations of a (B, 3, H, W) batch in [-1, 1]; each image with prob ``p``."""
    b, _, h, w = x.shape

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g) * (hi - lo) + lo

    on = torch.rand(b, generator=g) < p
    y = x.clone()
    # Down-up resampling: detail lost like in a VAE/diffusion sample.
    scale = torch.randint(0, 3, (b,), generator=g)
    resample = on & (torch.rand(b, generator=g) < 0.35)
    for k, s in enumerate((h // 2, h * 5 // 8, h * 3 // 4)):
        idx = resample & (scale == k)
        if idx.any():
            small = F.interpolate(y[idx], size=(s, s), mode="bilinear", antialias=True)
            y[idx] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    # Gaussian blur on the others (both at once wipes out dots and stripes).
    blur = on & ~resample & (torch.rand(b, generator=g) < 0.6)
    y = torch.where(blur[:, None, None, None], _blur(y, u(0.3, 0.9, b)), y)
    # Colour jitter in [0, 1] space: contrast about the mean, per-channel gain, brightness.
    z = (y + 1) / 2
    mean = z.mean(dim=(1, 2, 3), keepdim=True)
    contrast = torch.where(on, u(0.85, 1.15, b), 1.0)[:, None, None, None]
    gain = torch.where(on[:, None], u(0.93, 1.07, b, 3), 1.0)[:, :, None, None]
    shift = torch.where(on, u(-0.06, 0.06, b), 0.0)[:, None, None, None]
    z = ((z - mean) * contrast + mean) * gain + shift
    # Blotchy low-frequency noise and white noise.
    blotch = F.interpolate(torch.randn(b, 3, 4, 4, generator=g), size=(h, w), mode="bilinear")
    z = z + blotch * torch.where(on, u(0.0, 0.03, b), 0.0)[:, None, None, None]
    z = (
        z
        + torch.randn(z.shape, generator=g)
        * torch.where(on, u(0.0, 0.05, b), 0.0)[:, None, None, None]
    )
    return (z.clamp(0, 1) * 2 - 1).contiguous()


def train(
    out: str | Path, steps: int = 3000, batch_size: int = 128, lr: float = 3e-3, seed: int = 0
) -> Judge:
    """Train a judge from scratch on fresh batches and save it to ``out``."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    # Concepts are rare and the reason the judge exists: weight their columns up.
    weight = torch.ones(sum(HEADS.values()))
    weight[HEADS["objects"] : HEADS["objects"] + HEADS["concepts"]] = 3.0
    start, running = time.time(), 0.0
    judge.train()
    for step in range(steps):
        x, y, _ = make_batch(TRAIN_KEY, seed, step * batch_size, batch_size)
        logits = judge(degrade(x, g))
        loss = F.binary_cross_entropy_with_logits(logits, y, weight=weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()
        if (step + 1) % 100 == 0:
            log.info(
                "step %d/%d loss %.4f (%.0f s)", step + 1, steps, running / 100, time.time() - start
            )
            running = 0.0
    judge.eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    judge.save(out)
    log.info("trained in %.0f s; saved %s (%d bytes)", time.time() - start, out, out.stat().st_size)
    return judge


def validation_scenes(kinds: dict[str, float], n: int, seed: int = 0) -> list[Scene]:
    """``n`` held-out pretraining-distribution scenes of the given kind mix."""
    return [
        sample_scene(np.random.default_rng([VAL_KEY, seed, 1, i]), mix=kinds, pattern_prob=0.3)
        for i in range(n)
    ]


def _concept_report(judge: Judge, n: int, seed: int, degraded: bool) -> dict[str, Any]:
    """Per concept: accuracy on positives, near misses and random scenes (n//3 each)."""
    g = torch.Generator().manual_seed(seed + 1)
    k = max(n // 3, 1)
    report: dict[str, Any] = {}
    totals = np.zeros(2)
    for c, name in enumerate(CONCEPT_NAMES):
        row: dict[str, float] = {}
        for part, make in (
            ("positives", lambda r, nm=name: concept_scene(r, nm, True)),
            ("near_misses", lambda r, nm=name: concept_scene(r, nm, False)),
            ("random", lambda r: sample_scene(r, pattern_prob=0.4)),
        ):
            scenes = [make(np.random.default_rng([VAL_KEY, seed, 2, c, i])) for i in range(k)]
            if part == "random":
                scenes = [s for s in scenes if targets(s.objects)[HEADS["objects"] + c] == 0]
            x = images_to_tensor([render(s) for s in scenes])
            x = degrade(x, g, p=1.0) if degraded else x
            hit = judge.has_concept(x, name)
            correct = hit if part == "positives" else ~hit
            row[part] = round(correct.float().mean().item(), 4)
            totals += (correct.sum().item(), len(scenes))
        report[name] = row
    report["accuracy"] = round(totals[0] / totals[1], 4)
    return report


def validate(judge: Judge, n: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Accuracy on held-out images, clean and degraded, as a JSON-ready dict."""
    report: dict[str, Any] = {}
    for degraded in (False, True):
        g = torch.Generator().manual_seed(seed)
        part: dict[str, Any] = {}
        for label, kinds, m in (
            ("objects_1_2", {"one": 0.5, "two": 0.5}, n),
            ("objects_3_4", {"many": 1.0}, n // 2),
        ):
            scenes = validation_scenes(kinds, m, seed)
            x = images_to_tensor([render(s) for s in scenes])
            x = degrade(x, g, p=1.0) if degraded else x
            part[label] = evaluate_judge(judge, x, [s.objects for s in scenes])
        part["concepts"] = _concept_report(judge, n // 2, seed, degraded)
        report["degraded" if degraded else "clean"] = part
    return report
