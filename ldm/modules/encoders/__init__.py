"""Conditioning encoders."""

from ldm.modules.encoders.clip import FrozenCLIPEmbedder, PromptTooLongError

__all__ = ["FrozenCLIPEmbedder", "PromptTooLongError"]
