"""DINO image alignment (CustomConcept101's ``dinoeval_image``): ViT-S/16 CLS features.

The reference loads ``dino_vits16`` through ``torch.hub`` (a download). Here the weights come from
a local path: the DINO backbone file ``dino_deitsmall16_pretrain.pth`` (or any DINO/timm-layout
ViT state dict, ``.pth``/``.safetensors``, read without running code) or a transformers folder
(``facebook/dino-vits16``). The network is ``transformers.ViTModel``; the feature is the final
LayerNorm's CLS token, as DINO's ``forward`` returns. Images: ``Resize(256, BICUBIC)``,
``CenterCrop(224)``, ImageNet normalisation, as the reference.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from evaluation.scorers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Context,
    Sample,
    image_alignment,
    open_images,
    reference_transform,
)

_BLOCK = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}


def vit_from_dino(sd: dict[str, torch.Tensor], head_width: int = 64, eps: float = 1e-6):
    """A ``transformers.ViTModel`` (no pooler) holding a DINO/timm-layout ViT state dict."""
    from transformers import ViTConfig, ViTModel

    sd = {re.sub(r"^(module\.)?(backbone\.)?", "", k): v for k, v in sd.items()}
    if "patch_embed.proj.weight" not in sd or "cls_token" not in sd:
        raise ValueError("not a DINO/timm ViT state dict (no patch_embed.proj.weight)")
    width, _, patch, _ = sd["patch_embed.proj.weight"].shape
    grid = round((sd["pos_embed"].shape[1] - 1) ** 0.5)
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    config = ViTConfig(
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=width // head_width,
        intermediate_size=sd["blocks.0.mlp.fc1.weight"].shape[0],
        image_size=patch * grid,
        patch_size=patch,
        layer_norm_eps=eps,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        hidden_act="gelu",
    )
    out = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    for i in range(depth):
        src, dst = f"blocks.{i}", f"encoder.layer.{i}"
        for kind in ("weight", "bias"):
            qkv = sd.get(f"{src}.attn.qkv.{kind}")
            if qkv is not None:
                for name, t in zip(("query", "key", "value"), qkv.chunk(3), strict=True):
                    out[f"{dst}.attention.attention.{name}.{kind}"] = t
            for a, b in _BLOCK.items():
                out[f"{dst}.{b}.{kind}"] = sd[f"{src}.{a}.{kind}"]
    model = ViTModel(config, add_pooling_layer=False)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in out.items()}, False)
    if missing or unexpected:
        raise ValueError(f"DINO conversion: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def load_dino(path: str | Path):
    """A ViTModel from a DINO/timm state-dict file or a transformers folder."""
    path = Path(path)
    if path.is_dir():
        from transformers import ViTModel

        return ViTModel.from_pretrained(str(path), add_pooling_layer=False, local_files_only=True)
    if not path.is_file():
        raise FileNotFoundError(f"DINO weights not found: {path} (set scorers.dino.weights)")
    from ldm.checkpoint import load_state_dict

    return vit_from_dino(load_state_dict(path))


class DinoScorer:
    """``dino_image``: mean cosine of DINO CLS features to the training images."""

    name = "dino"
    text_metric = None
    image_metric = "dino_image"

    def __init__(
        self, weights: str | None = None, device: str = "cpu", batch_size: int = 32, model=None
    ) -> None:
        if weights is None and model is None:
            raise ValueError("dino scorer: set scorers.dino.weights to a local DINO ViT-S/16")
        self.weights = weights
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._model = model

    @property
    def model(self):
        if self._model is None:
            self._model = load_dino(self.weights)
        return self._model.to(self.device).eval()

    @torch.no_grad()
    def features(self, images) -> torch.Tensor:
        crop = int(self.model.config.image_size)
        resize = round(crop * 256 / 224)
        feats = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            x = torch.stack(
                [reference_transform(im, resize, crop, IMAGENET_MEAN, IMAGENET_STD) for im in chunk]
            ).to(self.device)
            feats.append(self.model(pixel_values=x).last_hidden_state[:, 0].float().cpu())
        return torch.cat(feats)

    def __call__(self, samples: Sequence[Sample], targets: Sequence[Path], context: Context):
        if not targets:
            return {}
        images = self.features(open_images([s.path for s in samples]))
        refs = self.features(open_images(list(targets)))
        return {"dino_image": image_alignment(images, refs).tolist()}
