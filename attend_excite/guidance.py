"""``AttendExcite``: the reference A&E update as a sampler step hook (no sampler fork).

Before step ``i``'s guided model call the hook runs the UNet on ``z_t`` with the conditional
prompt only, with gradients, reads the chosen tokens' cross-attention (``store.py``), and moves
``z_t <- z_t - alpha_i * dL/dz_t`` (``loss.py``) for ``i < max_iter_to_alter``. At the threshold
steps (``{0: 0.05, 10: 0.5, 20: 0.8}``) an image whose loss exceeds ``1 - tau`` is first refined
like the reference: measure, step, and stop once the loss measured *before* that step was
``<= 1 - tau`` or after ``max_refinement_steps``; then one more measurement and the regular step.
The step index is what counts (as in the reference and diffusers), whatever the timesteps.

Images of a batch are measured together and stay independent (GroupNorm and attention are per
image, so each image's gradient is that of its own loss); refinement runs only the images that
still need it. Processors are installed for each measurement and always restored.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from attend_excite.loss import ae_loss, max_attention_per_token, smoothing_kernel, step_sizes
from attend_excite.store import PLACES, CrossLayer, MapsRecorded, aggregate, capture, select_layers
from attend_excite.tokens import TokenSelection, select_tokens
from ldm.modules.attention import BasicTransformerBlock

log = logging.getLogger(__name__)

DEFAULT_THRESHOLDS: dict[int, float] = {0: 0.05, 10: 0.5, 20: 0.8}


class AttendExcite:
    """Step hook ``hook(x, t, info) -> x`` for :meth:`ldm.models.diffusion.sampling.Sampler.sample`.

    Args:
        model: a ``LatentDiffusion`` (``apply_model`` and ``model.diffusion_model``).
        selections: tokens per image (one is shared by the whole batch).
        scale_factor, scale_range: ``alpha_i = scale_factor * sqrt(linspace(*scale_range)[i])``.
        max_iter_to_alter: the latent is updated at steps ``i < max_iter_to_alter``.
        thresholds: ``{step: tau}``: refine until the loss is ``<= 1 - tau``.
        max_refinement_steps: refinement iterations at most.
        attn_res: map size (int or [h, w]) to read; ``None``: the rule in ``store.py``.
        places: UNet parts to read (``down``, ``mid``, ``up``).
        softmax_scale: the reference's x100 before the softmax over tokens.
        normalize_eot: drop the end token and padding from the softmax (reference SD 2.1 option).
        smooth, sigma, kernel_size: the reference smoothing (``loss.py``).
        stop_early: end measuring forwards at the last read layer (same maps, less compute).
        log_all_steps: also measure (no gradient) at steps that do not alter, for the record.
    """

    def __init__(
        self,
        model,
        selections: Sequence[TokenSelection],
        *,
        scale_factor: float = 20.0,
        scale_range: Sequence[float] = (1.0, 0.5),
        max_iter_to_alter: int = 25,
        thresholds: Mapping[int, float] | None = None,
        max_refinement_steps: int = 20,
        attn_res: int | Sequence[int] | None = None,
        places: Sequence[str] = PLACES,
        softmax_scale: float = 100.0,
        normalize_eot: bool = False,
        smooth: bool = True,
        sigma: float = 0.5,
        kernel_size: int = 3,
        stop_early: bool = True,
        log_all_steps: bool = True,
    ) -> None:
        self.model = model
        self.unet = model.model.diffusion_model
        self.selections = list(selections)
        if not self.selections:
            raise ValueError("no token selections")
        self.scale_factor = float(scale_factor)
        self.scale_range = tuple(float(s) for s in scale_range)
        self.max_iter_to_alter = int(max_iter_to_alter)
        raw = DEFAULT_THRESHOLDS if thresholds is None else thresholds
        self.thresholds = {int(k): float(v) for k, v in raw.items()}
        if any(not 0.0 <= v <= 1.0 for v in self.thresholds.values()):
            raise ValueError(f"thresholds must lie in [0, 1], got {self.thresholds}")
        self.max_refinement_steps = int(max_refinement_steps)
        self.attn_res = attn_res
        self.places = tuple(places)
        self.softmax_scale = float(softmax_scale)
        self.normalize_eot = bool(normalize_eot)
        self.kernel = smoothing_kernel(kernel_size, sigma) if smooth else None
        self.stop_early = stop_early
        self.log_all_steps = log_all_steps
        self.settings = {
            "scale_factor": self.scale_factor,
            "scale_range": list(self.scale_range),
            "max_iter_to_alter": self.max_iter_to_alter,
            "thresholds": self.thresholds,
            "max_refinement_steps": self.max_refinement_steps,
            "attn_res": attn_res if attn_res is None or isinstance(attn_res, int) else [*attn_res],
            "places": list(self.places),
            "softmax_scale": self.softmax_scale,
            "normalize_eot": self.normalize_eot,
            "smooth": smooth,
            "sigma": sigma,
            "kernel_size": kernel_size,
        }
        self.check_no_checkpointing()
        self.layers: list[CrossLayer] = []
        self.size: tuple[int, int] = (0, 0)
        self.history: list[list[dict[str, Any]]] = []
        self.maps: list[dict[int, Tensor]] = []

    @classmethod
    def for_prompts(
        cls,
        model,
        prompts: Sequence[str],
        words: Sequence[str] = (),
        token_indices: Sequence[int] = (),
        **kwargs: Any,
    ) -> AttendExcite:
        """Select ``words`` / ``token_indices`` in each prompt (see ``tokens.py``)."""
        enc = model.cond_stage_model
        selections = [
            select_tokens(enc.tokenizer, p, words, token_indices, enc.max_length) for p in prompts
        ]
        for sel in selections:
            log.info(
                "A&E tokens of %r: %s", sel.prompt, dict(zip(sel.indices, sel.pieces, strict=True))
            )
        return cls(model, selections, **kwargs)

    def check_no_checkpointing(self) -> None:
        """A&E needs gradients through the UNet: refuse gradient checkpointing."""
        on = [m for m in self.unet.modules() if isinstance(m, BasicTransformerBlock)]
        on = [m for m in on if m.use_checkpoint]
        if on:
            raise RuntimeError(
                f"Attend-and-Excite differentiates through the UNet while sampling, but gradient "
                f"checkpointing is on in {len(on)} transformer blocks: set "
                f"unet_config.params.use_checkpoint=false"
            )

    def layers_for(self, latent_hw: Sequence[int]) -> tuple[list[CrossLayer], tuple[int, int]]:
        """The layers read and their map size for a latent of ``latent_hw`` (h, w)."""
        return select_layers(self.unet, latent_hw, self.attn_res, self.places)

    # ------------------------------------------------------------------ hook
    def __call__(self, x: Tensor, t: Tensor, info: Mapping[str, Any]) -> Tensor:
        i, n = int(info["i"]), int(info["num_steps"])
        if i == 0 or len(self.history) != x.shape[0]:
            self._start(x)
        cond = info["cond"]
        alter = i < self.max_iter_to_alter
        tau = self.thresholds.get(i)
        rows = list(range(x.shape[0]))
        alpha = step_sizes(self.scale_factor, n, self.scale_range)[i]
        if not alter and tau is None:
            if self.log_all_steps:
                with torch.no_grad():
                    loss, maxima, maps = self._measure(x, t, cond, rows)
                self._record(i, t, 0.0, rows, loss, maxima, maps)
            return x
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            loss, maxima, maps = self._measure(leaf, t, cond, rows)
            self._record(i, t, alpha if alter else 0.0, rows, loss, maxima, maps)
            (grad,) = torch.autograd.grad(loss.sum(), leaf)
        step = alpha * grad
        out = leaf.detach() - step if alter else x.detach().clone()
        if tau is not None:
            target = max(0.0, 1.0 - tau)
            todo = [b for b in rows if float(loss[b].detach()) > target]
            if todo:
                # The reference's first refinement iteration re-measures this same latent;
                # its update is the one just computed.
                start = leaf.detach()[todo] - step[todo]
                out[todo] = self._refine(start, t, cond, todo, target, alpha, alter, i)
        return out.to(x.dtype)

    def _refine(
        self,
        x: Tensor,
        t: Tensor,
        cond: Tensor,
        rows: list[int],
        target: float,
        alpha: float,
        alter: bool,
        i: int,
    ) -> Tensor:
        """Refinement of ``rows`` (x already took the first step); returns their new latents."""
        iters = [1] * len(rows)
        active = [a for a in range(len(rows)) if iters[a] < self.max_refinement_steps]
        x = x.clone()
        while active:
            sub = [rows[a] for a in active]
            with torch.enable_grad():
                leaf = x[active].detach().requires_grad_(True)
                loss, _, _ = self._measure(leaf, t[sub], cond[sub], sub)
                (grad,) = torch.autograd.grad(loss.sum(), leaf)
            x[active] = leaf.detach() - alpha * grad
            for a in active:
                iters[a] += 1
            # Like the reference: stop when the loss measured before this update was reached.
            active = [
                a
                for a, lo in zip(active, loss.detach().tolist(), strict=True)
                if lo > target and iters[a] < self.max_refinement_steps
            ]
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            loss, maxima, _ = self._measure(leaf, t[rows], cond[rows], rows)
            (grad,) = torch.autograd.grad(loss.sum(), leaf)
        for r, b in enumerate(rows):
            self.history[b][-1]["refinement"] = {
                "iterations": iters[r],
                "loss": float(loss[r].detach()),
                "max_attention": maxima[r].detach().tolist(),
            }
            log.info(
                "A&E step %d image %d: %d refinement iterations, loss %.3f -> %.3f (target %.3f)",
                i,
                b,
                iters[r],
                self.history[b][-1]["loss"],
                float(loss[r].detach()),
                target,
            )
        return leaf.detach() - alpha * grad if alter else leaf.detach()

    # ------------------------------------------------------------ internals
    def _start(self, x: Tensor) -> None:
        batch = x.shape[0]
        if len(self.selections) == 1 and batch > 1:
            self.selections = self.selections * batch
        if len(self.selections) != batch:
            raise ValueError(f"{len(self.selections)} token selections for a batch of {batch}")
        self.check_no_checkpointing()
        self.layers, self.size = self.layers_for(x.shape[-2:])
        log.info(
            "A&E reads %d cross-attention layers at %dx%d: %s",
            len(self.layers),
            *self.size,
            [la.name for la in self.layers],
        )
        self.history = [[] for _ in range(batch)]
        self.maps = [{} for _ in range(batch)]

    def _measure(
        self, x: Tensor, t: Tensor, cond: Tensor, rows: Sequence[int]
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Conditional forward of ``x`` (the images ``rows``): losses (R,), per-image maxima
        (K,) and smoothed maps (K, h, w)."""
        # The forward may end early at the last read layer (MapsRecorded); processors restore.
        with (
            capture(self.unet, self.layers, self.stop_early) as store,
            contextlib.suppress(MapsRecorded),
        ):
            self.model.apply_model(x, t, cond)
        agg = aggregate(store, self.layers, self.size)  # (R, h, w, Nk)
        losses, maxima, maps = [], [], []
        for r, b in enumerate(rows):
            sel = self.selections[b]
            m, sm = max_attention_per_token(
                agg[r],
                sel.indices,
                self.softmax_scale,
                self.kernel,
                sel.n_tokens if self.normalize_eot else None,
            )
            losses.append(ae_loss(m))
            maxima.append(m)
            maps.append(sm)
        return torch.stack(losses), maxima, maps

    def _record(self, i, t, alpha, rows, loss, maxima, maps) -> None:
        for r, b in enumerate(rows):
            self.history[b].append(
                {
                    "i": i,
                    "t": int(t[b]),
                    "step_size": float(alpha),
                    "loss": float(loss[r].detach()),
                    "max_attention": maxima[r].detach().tolist(),
                }
            )
            self.maps[b][i] = maps[r].detach().float().cpu()
        log.debug("A&E step %d: losses %s", i, [round(v, 4) for v in loss.detach().tolist()])

    def record(self, row: int) -> dict[str, Any]:
        """Everything measured for image ``row``: tokens, layers, settings and every step."""
        sel = self.selections[row]
        return {
            "prompt": sel.prompt,
            "tokens": [
                {"index": i, "piece": p, "word": w}
                for i, p, w in zip(sel.indices, sel.pieces, sel.words, strict=True)
            ],
            "map_size": list(self.size),
            "layers": [la.name for la in self.layers],
            "settings": self.settings,
            "steps": self.history[row],
        }


def from_config(model, prompts: Sequence[str], cfg: Mapping[str, Any]) -> AttendExcite | None:
    """The hook described by an ``attend_excite`` config block, or ``None`` if not ``enabled``.

    Keys other than ``enabled`` and ``figure`` (used by ``sample.py``) are the arguments of
    :meth:`AttendExcite.for_prompts`.
    """
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if not cfg.get("enabled", False):
        return None
    kwargs = {k: v for k, v in cfg.items() if k not in ("enabled", "figure")}
    return AttendExcite.for_prompts(model, prompts, **kwargs)
