"""``LatentDiffusion``: the one CompVis-compatible SD v1 model every method specialises.

State-dict keys equal the original checkpoints' (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.*`` and the DDPM schedule buffers), so
``sd-v1-4.ckpt`` and ``v1-5-pruned-emaonly.safetensors`` load without conversion.

Variants override only the small methods below: ``trainable_parameters``, ``install_hooks``,
``extra_losses``, ``conditioning``, ``batch_mask`` and ``export_state_dict`` /
``export_metadata``; never copy a body from here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from ldm.checkpoint import fingerprint, key_digest
from ldm.modules.diffusionmodules.schedule import ddpm_schedule_buffers
from ldm.modules.ema import LitEma
from ldm.precision import autocast_for, cast_frozen, castable, parse_dtype
from ldm.util import count_params, instantiate_from_config

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[3]

# Keys of the original YAML that describe things SD v1 inference/fine-tuning never uses.
COMPVIS_IGNORED = frozenset(
    {"num_timesteps_cond", "log_every_t", "monitor", "scheduler_config", "use_ema", "ckpt_path"}
)


def resolve_path(path: str | Path) -> Path:
    """A path as given, else relative to the project root (so configs can name shipped files)."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    return PROJECT_ROOT / path


class DiffusionWrapper(nn.Module):
    """Holds the UNet as ``diffusion_model`` so keys read ``model.diffusion_model.*``."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.diffusion_model = unet

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None) -> Tensor:
        return self.diffusion_model(x, t, context=context)


class LatentDiffusion(pl.LightningModule):
    """Text-conditioned latent diffusion with epsilon prediction and a DDPM schedule.

    Args:
        cond_stage_trainable: train the text encoder too (toy pretraining); SD keeps it frozen.
        cond_drop_prob: probability of training on the empty prompt (classifier-free guidance).
        optimizer: a partial optimizer factory (Hydra ``_partial_``); AdamW by default.
        scale_lr: multiply ``learning_rate`` by batch size x devices x accumulation, as the
            reference recipes do; the effective rate is always logged.
        frozen_dtype: ``"bf16"``/``"fp16"`` stores the weights that do not train in that dtype
            (norm layers excepted) and runs the networks under autocast (``ldm.precision``).
            ``"auto"``: bf16 where the hardware runs it fast, for variants that save only what
            they train (``saves_only_trained``); ``None`` keeps everything fp32.
    """

    # A variant that saves only its trained tensors (a delta) loses nothing when the frozen
    # weights are rounded; ``frozen_dtype: auto`` is honoured only then.
    saves_only_trained: bool = False

    def __init__(
        self,
        unet_config: Mapping[str, Any],
        first_stage_config: Mapping[str, Any],
        cond_stage_config: Mapping[str, Any],
        linear_start: float = 0.00085,
        linear_end: float = 0.012,
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        scale_factor: float | None = 0.18215,
        image_size: int = 64,
        channels: int = 4,
        first_stage_key: str = "image",
        cond_stage_key: str = "caption",
        conditioning_key: str = "crossattn",
        cond_stage_trainable: bool = False,
        cond_drop_prob: float = 0.0,
        parameterization: str = "eps",
        learning_rate: float = 1e-5,
        scale_lr: bool = False,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[..., Any] | None = None,
        ema_decay: float | None = None,
        first_stage_ckpt: str | None = None,
        ckpt: str | None = None,
        frozen_dtype: str | None = None,
        **compvis_extra: Any,
    ) -> None:
        super().__init__()
        unknown = set(compvis_extra) - COMPVIS_IGNORED
        if unknown:
            raise TypeError(f"LatentDiffusion got unknown arguments: {sorted(unknown)}")
        if conditioning_key != "crossattn" or parameterization != "eps":
            raise ValueError("only crossattn conditioning with eps parameterization (SD v1)")
        self.model = DiffusionWrapper(instantiate_from_config(unet_config))
        self.first_stage_model = instantiate_from_config(first_stage_config)
        self.cond_stage_model = instantiate_from_config(cond_stage_config)
        self.first_stage_model.eval().requires_grad_(False)
        self.cond_stage_trainable = cond_stage_trainable
        if cond_stage_trainable:
            self.cond_stage_model.requires_grad_(True)
        else:
            self.cond_stage_model.freeze()
        if scale_factor is None:
            # Estimated as 1/std of the first training batch's latents (CompVis scale_by_std) and
            # kept in the state dict; NaN until then.
            self.register_buffer("scale_factor", torch.tensor(float("nan")))
        else:
            self.scale_factor = scale_factor
        self.image_size = image_size
        self.channels = channels
        self.first_stage_key = first_stage_key
        self.cond_stage_key = cond_stage_key
        self.cond_drop_prob = cond_drop_prob
        self.learning_rate = learning_rate
        self.scale_lr = scale_lr
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.register_schedule(beta_schedule, timesteps, linear_start, linear_end)
        # EMA of the UNet (keys ``model_ema.*`` as in CompVis); exported in place of the UNet.
        self.model_ema = LitEma(self.model, ema_decay) if ema_decay else None
        if first_stage_ckpt:
            self.load_first_stage(first_stage_ckpt)
        if ckpt:
            self.load_weights(resolve_path(ckpt))
        self.install_hooks()
        # "auto" skips full-model variants: their export would carry the rounded weights.
        auto_off = frozen_dtype == "auto" and not self.saves_only_trained
        self.frozen_dtype = None if auto_off else parse_dtype(frozen_dtype)
        self.loaded_digests: dict[str, bytes] = {}  # fingerprint parts of the rounded weights
        if self.frozen_dtype is not None:
            # The fingerprint of the weights as loaded (deltas record it), before rounding them.
            params = castable(self, self.frozen_dtype)
            self.loaded_digests = {
                k: key_digest(k, p) for k, p in params.items() if p.device.type != "meta"
            }
            cast_frozen(params, self.frozen_dtype)
            n = sum(p.numel() for p in params.values())
            log.info("frozen weights in %s: %.1f M parameters", self.frozen_dtype, n / 1e6)

    # ----------------------------------------------------------------- schedule
    def register_schedule(
        self, schedule: str, timesteps: int, linear_start: float, linear_end: float
    ) -> None:
        """The twelve DDPM buffers of the original checkpoints, computed as CompVis does."""
        self.num_timesteps = timesteps
        buffers = ddpm_schedule_buffers(linear_start, linear_end, timesteps, schedule)
        for name, value in buffers.items():
            self.register_buffer(name, value)

    # ---------------------------------------------------------- hook points
    def install_hooks(self) -> None:
        """Called at the end of ``__init__``: variants install processors or hooks here."""

    def trainable_parameters(self) -> Iterable[nn.Parameter | dict[str, Any]]:
        """What the optimizer trains: the UNet, plus the text encoder when it is trainable.

        Variants may also return parameter groups, ``{"params": [...], "lr": base_lr}``: their
        ``lr`` is a base rate, scaled by :meth:`lr_factor` like ``learning_rate`` unless the group
        says ``"scale_lr": False``."""
        params = list(self.model.parameters())
        if self.cond_stage_trainable:
            params += list(self.cond_stage_model.parameters())
        return params

    def extra_losses(
        self, batch: Mapping[str, Any], out: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Additional weighted loss terms, summed into the training loss."""
        return {}

    def batch_mask(self, batch: Mapping[str, Any], z: Tensor) -> Tensor | None:
        """A (B, 1, h, w) loss mask in latent space, or None for the plain mean."""
        return None

    def resume_callback(self, source: str, folder: str | Path) -> pl.Callback:
        """A callback that restores what :meth:`export_state_dict` saved (``resume=``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot resume from saved weights yet")

    def export_metadata(self) -> dict[str, str]:
        """String metadata saved next to :meth:`export_state_dict` (safetensors header)."""
        return {}

    # ------------------------------------------------- CompVis method names
    # With ``frozen_dtype`` the networks run under autocast and hand back fp32 tensors, so the
    # samplers, losses and every caller see the same dtypes as without it.
    def compute_precision(self):
        """The autocast context of ``frozen_dtype`` (a no-op without it)."""
        return autocast_for(self.device, self.frozen_dtype)

    def _full(self, t: Tensor) -> Tensor:
        return t if self.frozen_dtype is None else t.float()

    def pixel_size(self) -> int:
        """Image side in pixels: the latent side times the autoencoder's downsampling."""
        return int(self.image_size) * int(self.first_stage_model.downsample_factor)

    @torch.no_grad()
    def encode_first_stage(self, x: Tensor):
        with self.compute_precision():
            return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, posterior, generator: torch.Generator | None = None):
        z = posterior.sample(generator) if hasattr(posterior, "sample") else posterior
        return self.scale_factor * self._full(z)

    def decode_first_stage(self, z: Tensor) -> Tensor:
        if isinstance(self.scale_factor, Tensor) and torch.isnan(self.scale_factor):
            raise RuntimeError("scale_factor is unset: load a checkpoint or train a step first")
        with self.compute_precision():
            return self._full(self.first_stage_model.decode(z / self.scale_factor))

    def get_learned_conditioning(self, prompts: Sequence[str]) -> Tensor:
        with self.compute_precision():
            return self._full(self.cond_stage_model.encode(list(prompts)))

    def apply_model(self, x_noisy: Tensor, t: Tensor, cond: Any) -> Tensor:
        """Predicted noise. ``cond`` is the context tensor, or CompVis' ``{"c_crossattn": [c]}``."""
        if isinstance(cond, Mapping):
            cond = torch.cat(list(cond["c_crossattn"]), dim=1)
        elif isinstance(cond, list):
            cond = torch.cat(cond, dim=1)
        with self.compute_precision():
            return self._full(self.model(x_noisy, t, cond))

    # --------------------------------------------------------- diffusion
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        a = self.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1).to(x0.dtype)
        s = self.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1).to(x0.dtype)
        return a * x0 + s * noise

    def p_losses(
        self,
        x0: Tensor,
        cond: Tensor,
        t: Tensor,
        noise: Tensor | None = None,
        mask: Tensor | None = None,
        weight: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Epsilon MSE; with a (B, 1, h, w) mask, each sample's masked squared error is normalised
        by its own mask area before the batch mean (as Custom Diffusion does), so a sample counts
        the same whatever its area; an all-ones mask gives the plain mean. ``weight`` (B,) scales
        each sample's loss in that mean (e.g. a prior-preservation weight); None means all 1."""
        noise = torch.randn_like(x0) if noise is None else noise
        eps = self.apply_model(self.q_sample(x0, t, noise), t, cond)
        err = (eps.float() - noise.float()) ** 2
        if mask is None and weight is None:
            return err.mean(), {"eps": eps, "noise": noise}
        if mask is None:
            per_sample = err.flatten(1).mean(1)
        else:
            mask = mask.to(err.dtype).expand_as(err)
            per_sample = (err * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1.0)
        if weight is not None:
            per_sample = per_sample * weight.to(per_sample)
        return per_sample.mean(), {"eps": eps, "noise": noise}

    def get_input(self, batch: Mapping[str, Any]) -> tuple[Tensor, list[str]]:
        """Images (B, H, W, C) in [-1, 1] -> scaled latents; captions as a list."""
        x = batch[self.first_stage_key].permute(0, 3, 1, 2).contiguous().to(self.dtype)
        z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()
        return z, list(batch[self.cond_stage_key])

    def conditioning(self, batch: Mapping[str, Any], captions: list[str]) -> Tensor:
        """Captions -> context, with classifier-free-guidance caption dropout when training."""
        if self.training and self.cond_drop_prob > 0:
            drop = torch.rand(len(captions)) < self.cond_drop_prob
            captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        return self.get_learned_conditioning(captions)

    def shared_step(self, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        z, captions = self.get_input(batch)
        cond = self.conditioning(batch, captions)
        t = torch.randint(0, self.num_timesteps, (z.shape[0],), device=z.device)
        mask, weight = self.batch_mask(batch, z), batch.get("loss_weight")
        loss, out = self.p_losses(z, cond, t, mask=mask, weight=weight)
        logs = {"loss_simple": loss.detach()}
        for name, value in self.extra_losses(batch, out).items():
            loss = loss + value
            logs[name] = value.detach()
        logs["loss"] = loss.detach()
        return loss, logs

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        loss, logs = self.shared_step(batch)
        self.log("train/loss", logs.pop("loss"), prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in logs.items()})
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        _, logs = self.shared_step(batch)
        self.log("val/loss", logs["loss"], prog_bar=True)

    @torch.no_grad()
    def on_train_batch_start(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        if isinstance(self.scale_factor, Tensor) and torch.isnan(self.scale_factor):
            x = batch[self.first_stage_key].permute(0, 3, 1, 2).to(self.dtype)
            z = self.encode_first_stage(x).sample()
            std = self.trainer.strategy.reduce(z.float().std(), reduce_op="mean")
            self.scale_factor.fill_(1.0 / float(std))
            log.info("scale_factor set to %.5f (1 / latent std)", float(self.scale_factor))

    def on_train_batch_end(self, outputs: Any, batch: Mapping[str, Any], batch_idx: int) -> None:
        if self.model_ema is not None:
            self.model_ema(self.model)

    @contextmanager
    def ema_scope(self) -> Iterator[None]:
        """Use the EMA UNet weights inside the block (no-op without EMA)."""
        if self.model_ema is None:
            yield
            return
        with self.model_ema.swapped_in(self.model):
            yield

    def train(self, mode: bool = True) -> LatentDiffusion:
        # Frozen parts stay in eval mode (dropout off) whatever Lightning asks of the rest.
        super().train(mode)
        self.first_stage_model.eval()
        if not self.cond_stage_trainable:
            self.cond_stage_model.eval()
        return self

    # ----------------------------------------------------------- optimiser
    def lr_factor(self) -> float:
        """batch x devices x accumulation with ``scale_lr``, else 1."""
        if not self.scale_lr:
            return 1.0
        trainer = self.trainer
        batch = getattr(trainer.datamodule, "batch_size", 1) if trainer.datamodule else 1
        return float(batch * trainer.world_size * trainer.accumulate_grad_batches)

    def effective_learning_rate(self) -> float:
        return self.learning_rate * self.lr_factor()

    def param_groups(self) -> list[nn.Parameter] | list[dict[str, Any]]:
        """:meth:`trainable_parameters` with gradients, as a plain list or, when a variant
        returns groups, as groups with effective rates."""
        items = list(self.trainable_parameters())
        plain = [p for p in items if isinstance(p, nn.Parameter) and p.requires_grad]
        dicts = [g for g in items if isinstance(g, Mapping)]
        if not dicts:
            return plain
        factor = self.lr_factor()
        groups = [{"params": plain}] if plain else []
        for g in dicts:
            g = dict(g)
            params = [p for p in g.pop("params") if p.requires_grad]
            scale = factor if g.pop("scale_lr", True) else 1.0
            groups.append({**g, "params": params, "lr": g.get("lr", self.learning_rate) * scale})
        return [g for g in groups if g["params"]]

    def configure_optimizers(self) -> Any:
        params = self.param_groups()
        lr = self.effective_learning_rate()
        tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
        log.info(
            "effective lr %.3g (base %.3g, scale_lr=%s); %s trainable parameters",
            lr,
            self.learning_rate,
            self.scale_lr,
            f"{sum(p.numel() for p in tensors):,}",
        )
        group_lrs = {f"effective_lr_group{i}": g["lr"] for i, g in enumerate(params)
                     if isinstance(g, dict) and "lr" in g}  # fmt: skip
        for name, value in group_lrs.items():
            log.info("%s %.3g", name, value)
        if self.logger is not None:
            self.logger.log_hyperparams({"effective_lr": lr, **group_lrs})
        factory = self.optimizer_factory or torch.optim.AdamW
        opt = factory(params, lr=lr)
        if self.lr_scheduler_factory is None:
            return opt
        # Stepped every optimizer step: schedules are written in steps (e.g. total_iters=max_steps).
        scheduler = {"scheduler": self.lr_scheduler_factory(opt), "interval": "step"}
        return {"optimizer": opt, "lr_scheduler": scheduler}

    # --------------------------------------------------------------- weights
    def load_weights(self, path: str, strict: bool = False) -> None:
        from ldm.checkpoint import load_into, load_state_dict

        load_into(self, load_state_dict(path), strict=strict)

    def load_first_stage(self, path: str) -> None:
        from ldm.checkpoint import load_into, load_state_dict

        sd = load_state_dict(resolve_path(path))
        prefix = "first_stage_model."
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        load_into(self.first_stage_model, sd, strict=True)

    def weights_fingerprint(self, exclude: Iterable[str] = ()) -> str:
        """:func:`~ldm.checkpoint.fingerprint` of the state dict. Weights kept in lower precision
        (``frozen_dtype``) count with the values they were loaded with, so a delta trained on a
        bf16-frozen model belongs to the fp32 base, and the other way round."""
        return fingerprint(self.state_dict(), exclude, digests=self.loaded_digests)

    def export_state_dict(self) -> dict[str, Tensor]:
        """What a training run saves: the whole model (with the EMA UNet if any); variants save
        their delta."""
        with self.ema_scope():
            sd = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        return {k: v for k, v in sd.items() if not k.startswith("model_ema.")}

    def summary(self) -> str:
        return (
            f"UNet {count_params(self.model) / 1e6:.1f}M, VAE "
            f"{count_params(self.first_stage_model) / 1e6:.1f}M, text "
            f"{count_params(self.cond_stage_model) / 1e6:.1f}M params"
        )
