"""``CrossInit``: textual inversion whose tokens start at text-encoder outputs, tied to them by
an L2 regularizer; and ``CustomDiffusionCrossInit``, Custom Diffusion trained with such tokens.

Both hold a :class:`CrossInitTokens` (the tokens, their initial vectors ``v0`` and the
regularizer) and override only the base hooks: ``install_hooks``, ``trainable_parameters``,
``extra_losses`` (``loss_reg``), ``export_state_dict`` / ``export_metadata``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from torch import Tensor, nn

from cross_init.init import cross_init_vectors, load_names, random_rows, word_rows
from cross_init.loss import l2_tie
from custom.delta import delta_metadata
from custom.model import CustomDiffusion
from ldm.models.diffusion.ddpm import LatentDiffusion, resolve_path
from ldm.modules.tokens import add_placeholder_tokens, placeholder_embedding

log = logging.getLogger(__name__)

INITS = ("cross", "words", "random")


class CrossInitTokens(nn.Module):
    """New tokens of a text encoder, initialised by one of :data:`INITS`, with the L2 tie.

    Args:
        tokens: the new tokens in prompt order, e.g. ``["v1*", "v2*"]`` (from config).
        init: ``cross`` (Cross Initialization from ``names``), ``words`` (classic textual
            inversion: the input rows of ``init_words``) or ``random`` (Gaussian rows with the
            table's per-dimension statistics; ``seed``).
        names: a one-name-per-line file for ``cross``; None: the shipped celebrity list.
        reg_weight: lambda of ``lambda * mean_k ||v_k - v0_k||`` (reference 1e-5).
    """

    def __init__(
        self,
        tokens: Sequence[str],
        init: str = "cross",
        names: str | Path | None = None,
        init_words: Sequence[str] | None = None,
        reg_weight: float = 1e-5,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.tokens = list(tokens)
        if not self.tokens:
            raise ValueError("CrossInit needs at least one placeholder token")
        if init == "words" and len(init_words or ()) != len(self.tokens):
            raise ValueError(f"init=words needs one init word per token ({len(self.tokens)})")
        self.init = init
        self.names = names
        self.init_words = list(init_words or ())
        self.reg_weight = reg_weight
        self.seed = seed
        # v0 (n, D); not in the state dict, so base checkpoints keep their keys.
        self.register_buffer("initial", None, persistent=False)

    def install(self, embedder: nn.Module) -> None:
        """Add the tokens to ``embedder`` and write their initial rows (also kept as ``v0``)."""
        add_placeholder_tokens(embedder, self.tokens)
        if self.init == "cross":
            names = load_names(resolve_path(self.names) if self.names else None)
            v0 = cross_init_vectors(embedder, self.tokens, names)
        elif self.init == "words":
            v0 = word_rows(embedder, self.init_words)
        else:
            v0 = random_rows(embedder, len(self.tokens), self.seed)
        emb = placeholder_embedding(embedder)
        emb.placeholder_weight.data[self.index(embedder)] = v0.to(emb.placeholder_weight)
        self.initial = v0.detach().clone()
        log.info(
            "%s init of %s: row norms %s",
            self.init,
            self.tokens,
            [round(float(x), 3) for x in v0.norm(dim=1)],
        )

    def index(self, embedder: nn.Module) -> list[int]:
        """Rows of the tokens in the embedder's ``placeholder_weight``."""
        have = placeholder_embedding(embedder).tokens
        return [have.index(t) for t in self.tokens]

    def vectors(self, embedder: nn.Module) -> Tensor:
        """The tokens' current rows (n, D), with gradient."""
        return placeholder_embedding(embedder).placeholder_weight[self.index(embedder)]

    def loss(self, embedder: nn.Module) -> Tensor:
        """``reg_weight * mean_k ||v_k - v0_k||_2``."""
        return self.reg_weight * l2_tie(self.vectors(embedder), self.initial)

    def learned_embeddings(self, embedder: nn.Module) -> dict[str, Tensor]:
        """``{token: vector}`` (the reference's ``learned_embeds.bin`` content)."""
        rows = self.vectors(embedder).detach().cpu().clone()
        return {t: rows[i] for i, t in enumerate(self.tokens)}

    def describe(self) -> dict[str, str]:
        """String metadata of the init."""
        source = {"cross": str(self.names or "celeb_names.txt"), "words": " ".join(self.init_words)}
        return {
            "init": self.init,
            "init_source": source.get(self.init, f"seed {self.seed}"),
            "reg_weight": str(self.reg_weight),
        }


def _token_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    keys = ("init", "names", "init_words", "reg_weight", "init_seed")
    out = {k: kwargs.pop(k) for k in keys if k in kwargs}
    if "init_seed" in out:
        out["seed"] = out.pop("init_seed")
    return out


class CrossInit(LatentDiffusion):
    """Cross Initialization (Pang et al., CVPR 2024) on the CompVis SD v1 model: only the new
    tokens' input rows learn.

    Args:
        placeholder_tokens: the new tokens, from config (the recipes: two, ``["v1*", "v2*"]``).
        init, names, init_words, reg_weight, init_seed: see :class:`CrossInitTokens`.
        **kwargs: ``LatentDiffusion`` arguments (``learning_rate``, ``scale_lr``, ``ckpt``, ...).
    """

    def __init__(self, *args: Any, placeholder_tokens: Sequence[str] = (), **kwargs: Any) -> None:
        if kwargs.get("cond_stage_trainable"):
            raise ValueError("CrossInit trains only the new token rows of the text encoder")
        # Read by install_hooks(), which LatentDiffusion.__init__ calls last.
        self._token_args = (list(placeholder_tokens), _token_kwargs(kwargs))
        super().__init__(*args, **kwargs)

    def install_hooks(self) -> None:
        tokens, options = self._token_args
        self.cross_init = CrossInitTokens(tokens, **options)
        self.cross_init.install(self.cond_stage_model)
        self.requires_grad_(False)
        self.token_rows().requires_grad_(True)

    def token_rows(self) -> nn.Parameter:
        return placeholder_embedding(self.cond_stage_model).placeholder_weight

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.token_rows()]

    def extra_losses(self, batch: Mapping[str, Any], out: Mapping[str, Tensor]) -> dict:
        return {"loss_reg": self.cross_init.loss(self.cond_stage_model)}

    def delta_keys(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def export_state_dict(self) -> dict[str, Tensor]:
        """The token rows under their model key: a delta :func:`custom.delta.apply_delta` and
        ``sample.py delta=`` read."""
        keys = set(self.delta_keys())
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items() if k in keys}

    def export_metadata(self) -> dict[str, str]:
        return delta_metadata(self, self.delta_keys(), method="cross_init",
                              **self.cross_init.describe())  # fmt: skip

    def resume_callback(self, source: str, folder: str | Path) -> pl.Callback:
        from custom.resume import ResumeFromDelta

        return ResumeFromDelta(source, folder)


class CustomDiffusionCrossInit(CustomDiffusion):
    """Custom Diffusion (cross-attention K/V) trained together with Cross-Init tokens (CD + CR).

    The tokens get their own base rate ``token_learning_rate`` (scaled like ``learning_rate``)
    and the L2 tie; Custom Diffusion's own ``modifier_tokens`` may be added as well.

    Args:
        placeholder_tokens: the Cross-Init tokens, e.g. ``["v1*", "v2*"]``.
        token_learning_rate: base rate of the token rows (reference Cross Init: 0.000625).
        init, names, init_words, reg_weight, init_seed: see :class:`CrossInitTokens`.
        **kwargs: ``CustomDiffusion`` arguments (``freeze_model``, ``learning_rate``, ...).
    """

    def __init__(
        self,
        *args: Any,
        placeholder_tokens: Sequence[str] = (),
        token_learning_rate: float = 6.25e-4,
        **kwargs: Any,
    ) -> None:
        self._token_args = (list(placeholder_tokens), _token_kwargs(kwargs))
        super().__init__(*args, token_learning_rate=token_learning_rate, **kwargs)

    def install_hooks(self) -> None:
        tokens, options = self._token_args
        self.cross_init = CrossInitTokens(tokens, **options)
        self.cross_init.install(self.cond_stage_model)
        super().install_hooks()  # freezes all but K/V and the token rows (CD's own tokens too)

    def extra_losses(self, batch: Mapping[str, Any], out: Mapping[str, Tensor]) -> dict:
        return {"loss_reg": self.cross_init.loss(self.cond_stage_model)}

    def export_metadata(self) -> dict[str, str]:
        return {**super().export_metadata(), "method": "custom_diffusion_cross_init",
                **self.cross_init.describe()}  # fmt: skip
