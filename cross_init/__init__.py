"""Cross Initialization — "Cross Initialization for Face Personalization of Text-to-Image
Models", Pang et al., CVPR 2024, arXiv:2312.15905.

Relative to LatentDiffusion it trains only the input embedding rows of n new tokens (default 2,
"v1* v2*"), initialised with the text encoder's *output* for the mean input embedding of known
names (per position; celebrities for faces), and adds an L2 tie of the rows to that start.

``init.py`` (the initialisation rule, name lists), ``loss.py`` (the regularizer), ``model.py``
(``CrossInit``; ``CustomDiffusionCrossInit``: Custom Diffusion K/V + Cross-Init tokens, CD + CR),
``embeddings.py`` (the reference's ``learned_embeds.bin``, diffusers textual-inversion files,
``sample.py embeddings=``). Data: ``data/face.py``; shipped: ``celeb_names.txt`` (691 names, MIT,
see NAMES_LICENSE.md) and ``faces/`` (3 CelebA-HQ photos, research use only). Recipes:
``configs/finetune_crossinit.yaml``, ``configs/finetune_cd_cr.yaml`` and their ``*_toy`` variants;
benchmark: ``bench/toy_crossinit.py``.
"""

from cross_init.embeddings import SaveEmbeddings, apply_embeddings, load_embeddings, save_embeddings
from cross_init.init import CELEB_NAMES, cross_init_vectors, load_names, mean_name_embeddings
from cross_init.loss import l2_tie
from cross_init.model import CrossInit, CrossInitTokens, CustomDiffusionCrossInit

__all__ = [
    "CELEB_NAMES",
    "CrossInit",
    "CrossInitTokens",
    "CustomDiffusionCrossInit",
    "SaveEmbeddings",
    "apply_embeddings",
    "cross_init_vectors",
    "l2_tie",
    "load_embeddings",
    "load_names",
    "mean_name_embeddings",
    "save_embeddings",
]
