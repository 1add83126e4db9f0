"""Attend-and-Excite — "Attend-and-Excite: Attention-Based Semantic Guidance for Text-to-Image
Diffusion Models", Chefer et al., SIGGRAPH 2023, arXiv:2301.13826.

Relative to LatentDiffusion it trains nothing: while sampling, before each of the first 25 steps, a
step hook reads the chosen tokens' 16x16 cross-attention from a gradient-enabled conditional pass
and moves the latent so the most neglected token gets a strongly attended patch.

``tokens.py`` (tokens by word or index), ``store.py`` (which layers; ``AttendExciteProcessor``),
``loss.py`` (smoothing, loss, step sizes), ``guidance.py`` (``AttendExcite``, the step hook),
``report.py`` (JSON record and attention-map figure). ``sample.py attend_excite.enabled=true
attend_excite.words=[cat,dog]`` or ``sampler=attend_excite``; benchmark:
``bench/toy_attend_excite.py``.
"""

from attend_excite.guidance import AttendExcite, from_config
from attend_excite.report import attention_figure, save_outputs, write_json
from attend_excite.store import AttendExciteProcessor, cross_attention_layers, select_layers
from attend_excite.tokens import TokenSelection, select_tokens

__all__ = [
    "AttendExcite",
    "AttendExciteProcessor",
    "TokenSelection",
    "attention_figure",
    "cross_attention_layers",
    "from_config",
    "save_outputs",
    "select_layers",
    "select_tokens",
    "write_json",
]
