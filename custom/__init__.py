"""Custom Diffusion — "Multi-Concept Customization of Text-to-Image Diffusion", Kumari et al.,
CVPR 2023, arXiv:2212.04488.

Relative to LatentDiffusion it trains only the UNet's cross-attention K/V projections (or all of
``attn2``) plus new ``<newN>`` token rows, detaches the start token's K/V in every
cross-attention, and mixes the concept's augmented images 1:1 with real or generated class images.

``model.py`` (``CustomDiffusion``), ``processors.py`` (``CustomDiffusionProcessor``), ``delta.py``
(save / load / apply the trained tensors), ``compress.py`` (low-rank deltas), ``compose.py``
(closed-form merging), ``extract.py`` (deltas of full checkpoints), ``formats.py`` and
``diffusers_loader.py`` (the reference's and diffusers' files), ``resume.py`` (continuing a run
from its last delta); ``python -m custom extract|compress|compose|export|import|info``. Recipes:
``configs/finetune_{noreg,real,gen,joint,face}.yaml``; data: ``data/concept.py``,
``data/transforms.py``, ``data/class_images.py``.
"""
