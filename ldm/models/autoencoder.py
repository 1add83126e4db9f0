"""KL-regularised autoencoder (the SD v1 first stage), with a light training step for the toy world.

SD's own autoencoder was trained with LPIPS and a patch discriminator; those need downloaded
weights, so :meth:`AutoencoderKL.training_step` uses L1 + L2 reconstruction and a small KL term,
which is enough for the procedural toy world. Loading SD weights needs no loss at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions import DiagonalGaussianDistribution


class AutoencoderKL(pl.LightningModule):
    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        embed_dim: int,
        lossconfig: Mapping[str, Any] | None = None,  # accepted from SD YAML; unused
        image_key: str = "image",
        learning_rate: float = 1e-4,
        kl_weight: float = 1e-6,
        monitor: str | None = None,  # accepted from SD YAML; unused
    ) -> None:
        super().__init__()
        ddconfig = dict(ddconfig)
        if not ddconfig.get("double_z", True):
            raise ValueError("the KL autoencoder needs double_z: true")
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z, 1)
        self.embed_dim = embed_dim
        self.downsample_factor = 2 ** (len(ddconfig["ch_mult"]) - 1)
        self.image_key = image_key
        self.learning_rate = learning_rate
        self.kl_weight = kl_weight

    def encode(self, x: Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: Tensor, sample: bool = True
    ) -> tuple[Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample() if sample else posterior.mode()
        return self.decode(z), posterior

    def get_input(self, batch: Mapping[str, Any]) -> Tensor:
        x = batch[self.image_key]  # (B, H, W, C) in [-1, 1], the CompVis convention
        return x.permute(0, 3, 1, 2).contiguous().float()

    def _loss(self, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        x = self.get_input(batch)
        rec, posterior = self(x)
        l1 = F.l1_loss(rec, x)
        l2 = F.mse_loss(rec, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = l1 + l2 + self.kl_weight * kl
        return loss, {"l1": l1, "l2": l2, "kl": kl}

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        loss, logs = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in logs.items()})
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        loss, logs = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/rec_l1", logs["l1"])

    def export_state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu() for k, v in self.state_dict().items()}

    def summary(self) -> str:
        return f"{sum(p.numel() for p in self.parameters()) / 1e6:.2f}M params"

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.learning_rate, weight_decay=0.0)
