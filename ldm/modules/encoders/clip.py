"""The SD v1 text encoder: a ``transformers.CLIPTextModel`` plus the real CLIP BPE tokenizer.

The tokenizer files ship in ``ldm/assets/clip_tokenizer`` (OpenAI CLIP, MIT), so nothing is ever
fetched from a hub. Weights come from the checkpoint (``cond_stage_model.transformer.*``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "assets" / "clip_tokenizer"

# openai/clip-vit-large-patch14's text tower, the SD v1 encoder.
SD_V1_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}


class PromptTooLongError(ValueError):
    """A prompt longer than the encoder's context (77 tokens for SD)."""


class FrozenCLIPEmbedder(nn.Module):
    """Prompts -> last hidden state (B, 77, D) of a CLIP text transformer.

    Args:
        text_config: ``CLIPTextConfig`` fields; defaults to SD v1's ViT-L/14 text tower.
        version: accepted for SD v1 YAML compatibility; never downloaded.
        freeze: put the encoder in eval mode with no gradients (SD v1). The toy world trains it.
        strict_length: refuse prompts longer than ``max_length`` instead of truncating them.
    """

    def __init__(
        self,
        text_config: Mapping[str, Any] | None = None,
        tokenizer_path: str | Path | None = None,
        max_length: int = 77,
        freeze: bool = True,
        version: str | None = None,
        strict_length: bool = False,
    ) -> None:
        super().__init__()
        config = dict(SD_V1_TEXT_CONFIG if text_config is None else text_config)
        config.setdefault("max_position_embeddings", max_length)
        self.tokenizer = CLIPTokenizer.from_pretrained(
            str(tokenizer_path or TOKENIZER_DIR), local_files_only=True
        )
        self.transformer = CLIPTextModel(CLIPTextConfig(**config))
        self.max_length = max_length
        self.strict_length = strict_length
        if freeze:
            self.freeze()

    def freeze(self) -> None:
        self.transformer.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.transformer.text_model.embeddings.token_embedding

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids (B, max_length), padded with the end token as SD does."""
        texts = list(texts)
        if self.strict_length:
            for text in texts:
                n = len(self.tokenizer(text).input_ids)
                if n > self.max_length:
                    raise PromptTooLongError(
                        f"prompt has {n} tokens, more than {self.max_length}: {text[:60]!r}..."
                    )
        batch = self.tokenizer(
            texts,
            truncation=True,
            max_length=self.max_length,
            padding="max_length",
            return_tensors="pt",
        )
        return batch.input_ids

    def encode_ids(self, ids: Tensor) -> Tensor:
        return self.transformer(
            input_ids=ids.to(self.token_embedding.weight.device)
        ).last_hidden_state

    def forward(self, texts: Sequence[str]) -> Tensor:
        return self.encode_ids(self.tokenize(texts))

    def encode(self, texts: Sequence[str]) -> Tensor:
        return self(texts)

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device
