"""CLIP text and image alignment (CustomConcept101's metrics), on open_clip or transformers.

``ClipScorer(pretrained, model_name)``: ``pretrained`` is an open_clip tag (``openai``,
``laion2b_s34b_b79k``: open_clip finds it in its cache or downloads it) or a local path — an
open_clip / OpenAI-layout state dict (``.safetensors``, ``.bin``, ``.pt``: read without running
code) or a transformers CLIP folder (``openai/clip-vit-base-patch32`` layout). The reference is
OpenAI's ViT-B/32, which needs QuickGELU: ``model_name: ViT-B-32-quickgelu``.

Backends (``backend``): ``open_clip`` (the package, when it imports: it needs torchvision, which
on CPU-torch machines comes with ``requirements-retrieval.txt``'s shim), ``transformers``
(``CLIPModel``, always available; open_clip state dicts are converted to it, with identical
outputs — tested), or ``auto``: open_clip if it imports, else transformers for a local path.
Images go through the reference's transform (:func:`~evaluation.scorers.reference_transform`)
on either backend, and texts through the OpenAI BPE (open_clip's, or the copy in
``ldm/assets/clip_tokenizer``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from evaluation.scorers import (
    CLIP_MEAN,
    CLIP_STD,
    Context,
    Sample,
    Scores,
    image_alignment,
    open_images,
    reference_transform,
    text_alignment,
)

log = logging.getLogger(__name__)


class OpenClipBackend:
    """An ``open_clip`` model and tokenizer."""

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu") -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, tuple | list) else size)

    @classmethod
    def create(cls, model_name: str, pretrained: str, device: str = "cpu") -> OpenClipBackend:
        try:
            import open_clip
        except Exception as exc:  # ImportError, or torchvision's RuntimeError without the shim
            raise RuntimeError(
                f"open_clip does not import here ({str(exc).splitlines()[0]}); install it "
                "(pip install -r requirements-retrieval.txt) or use backend=transformers with "
                "local weights"
            ) from None
        try:
            model = open_clip.create_model(model_name, pretrained=pretrained, device=device)
        except Exception as exc:  # unknown name/tag, weights not cached offline, bad file
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeError(f"open_clip cannot load {model_name}/{pretrained}: {msg}") from None
        return cls(model, open_clip.get_tokenizer(model_name), device)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels.to(self.device)).float().cpu()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(texts)).to(self.device)
        return self.model.encode_text(ids).float().cpu()


class TransformersBackend:
    """A ``transformers.CLIPModel`` and the OpenAI BPE tokenizer."""

    def __init__(self, model, tokenizer=None, device: str | torch.device = "cpu") -> None:
        from transformers import CLIPTokenizer

        from ldm.modules.encoders.clip import TOKENIZER_DIR

        self.model = model.to(device).eval()
        self.tokenizer = tokenizer or CLIPTokenizer.from_pretrained(
            str(TOKENIZER_DIR), local_files_only=True
        )
        self.device = torch.device(device)
        self.image_size = int(model.config.vision_config.image_size)
        self.context_length = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def create(cls, path: str | Path, quick_gelu: bool = True, device: str = "cpu"):
        from transformers import CLIPModel, CLIPTokenizer

        path = Path(path)
        if path.is_dir():
            model = CLIPModel.from_pretrained(str(path), local_files_only=True)
            tok = None
            if (path / "vocab.json").exists():
                tok = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
            return cls(model, tok, device)
        if path.is_file():
            from ldm.checkpoint import load_state_dict

            return cls(clip_from_open_clip(load_state_dict(path), quick_gelu), None, device)
        raise FileNotFoundError(f"CLIP weights not found: {path} (a file or a transformers folder)")

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixels.to(self.device)).float().cpu()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        batch = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.context_length,
            truncation=True,
            return_tensors="pt",
        ).to(self.device)
        return self.model.get_text_features(**batch).float().cpu()


def _count_blocks(sd: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    return 1 + max(int(m.group(1)) for k in sd if (m := pattern.match(k)))


def _convert_block(sd, out, src: str, dst: str) -> None:
    for (q, k, v), kind in (
        (sd[f"{src}.attn.in_proj_weight"].chunk(3), "weight"),
        (sd[f"{src}.attn.in_proj_bias"].chunk(3), "bias"),
    ):
        for name, t in zip("qkv", (q, k, v), strict=True):
            out[f"{dst}.self_attn.{name}_proj.{kind}"] = t
    pairs = {
        "attn.out_proj": "self_attn.out_proj",
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for a, b in pairs.items():
        for kind in ("weight", "bias"):
            out[f"{dst}.{b}.{kind}"] = sd[f"{src}.{a}.{kind}"]


def clip_from_open_clip(sd: dict[str, torch.Tensor], quick_gelu: bool = True, head_width=64):
    """A ``transformers.CLIPModel`` holding an open_clip / OpenAI-layout ViT CLIP state dict
    (config read off the tensor shapes; ``head_width`` 64 as in every OpenAI/open_clip ViT)."""
    from transformers import CLIPConfig, CLIPModel

    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if "visual.conv1.weight" not in sd or "text_projection" not in sd:
        raise ValueError("not an open_clip/OpenAI ViT CLIP state dict (no visual.conv1.weight)")
    v_width, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    t_width = sd["ln_final.weight"].shape[0]
    act = "quick_gelu" if quick_gelu else "gelu"
    vision = {
        "hidden_size": v_width,
        "intermediate_size": sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": _count_blocks(sd, "visual.transformer.resblocks."),
        "num_attention_heads": v_width // head_width,
        "image_size": patch * grid,
        "patch_size": patch,
        "hidden_act": act,
    }
    text = {
        "vocab_size": sd["token_embedding.weight"].shape[0],
        "hidden_size": t_width,
        "intermediate_size": sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": _count_blocks(sd, "transformer.resblocks."),
        "num_attention_heads": t_width // head_width,
        "max_position_embeddings": sd["positional_embedding"].shape[0],
        "hidden_act": act,
    }
    config = CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=sd["text_projection"].shape[1]
    )
    out = {
        "logit_scale": sd["logit_scale"].reshape(()) if "logit_scale" in sd else torch.tensor(0.0),
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_projection.weight": sd["text_projection"].T,
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "visual_projection.weight": sd["visual.proj"].T,
    }
    for a, b in (
        ("ln_final", "text_model.final_layer_norm"),
        ("visual.ln_pre", "vision_model.pre_layrnorm"),
        ("visual.ln_post", "vision_model.post_layernorm"),
    ):
        out[f"{b}.weight"], out[f"{b}.bias"] = sd[f"{a}.weight"], sd[f"{a}.bias"]
    for i in range(text["num_hidden_layers"]):
        _convert_block(sd, out, f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}")
    for i in range(vision["num_hidden_layers"]):
        _convert_block(
            sd, out, f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}"
        )
    model = CLIPModel(config)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in out.items()}, False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"CLIP conversion: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


class ClipScorer:
    """``clip_text`` (CLIPScore, ``text_weight`` x max(cos, 0)) and ``clip_image`` (mean cosine
    to the training images) with one CLIP model. See the module docstring for the weights."""

    name = "clip"
    text_metric = "clip_text"
    image_metric = "clip_image"

    def __init__(
        self,
        pretrained: str = "openai",
        model_name: str = "ViT-B-32-quickgelu",
        backend: str | OpenClipBackend | TransformersBackend = "auto",
        device: str = "cpu",
        batch_size: int = 32,
        text_weight: float = 2.5,
    ) -> None:
        self.pretrained = str(pretrained)
        self.model_name = model_name
        self.device = device
        self.batch_size = batch_size
        self.text_weight = text_weight
        self._backend = None if isinstance(backend, str) else backend
        self.backend_name = backend if isinstance(backend, str) else type(backend).__name__

    @property
    def backend(self):
        if self._backend is None:
            self._backend = self._create()
        return self._backend

    def _create(self):
        name, path = self.backend_name, Path(self.pretrained)
        if name not in ("auto", "open_clip", "transformers"):
            raise ValueError(f"clip backend must be auto, open_clip or transformers, got {name!r}")
        quick = "quickgelu" in self.model_name.lower()
        if name == "transformers" or (name == "auto" and path.is_dir()):
            return TransformersBackend.create(path, quick_gelu=quick, device=self.device)
        try:
            return OpenClipBackend.create(self.model_name, self.pretrained, self.device)
        except RuntimeError as exc:
            if name == "open_clip" or not path.is_file():
                raise
            log.info("clip: %s; using transformers", exc)
        return TransformersBackend.create(path, quick_gelu=quick, device=self.device)

    def image_features(self, images) -> torch.Tensor:
        size = self.backend.image_size
        feats = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            x = torch.stack(
                [reference_transform(im, size, size, CLIP_MEAN, CLIP_STD) for im in chunk]
            )
            feats.append(self.backend.encode_images(x))
        return torch.cat(feats)

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        unique = list(dict.fromkeys(texts))
        feats = torch.cat(
            [
                self.backend.encode_texts(unique[i : i + self.batch_size])
                for i in range(0, len(unique), self.batch_size)
            ]
        )
        return feats[[unique.index(t) for t in texts]]

    def __call__(self, samples: Sequence[Sample], targets: Sequence[Path], context: Context):
        images = self.image_features(open_images([s.path for s in samples]))
        texts = self.text_features([s.text for s in samples])
        out: Scores = {"clip_text": text_alignment(images, texts, self.text_weight).tolist()}
        if targets:
            refs = self.image_features(open_images(list(targets)))
            out["clip_image"] = image_alignment(images, refs).tolist()
        return out
