"""ViCo — "ViCo: Plug-and-play Visual Condition for Personalized Text-to-image Generation",
Hao et al., 2023, arXiv:2306.00971.

Relative to LatentDiffusion it keeps the UNet frozen, adds image cross-attention blocks fed by a
reference image run through the same UNet, and learns one placeholder token. Not implemented yet:
this package is reserved for it (see the project's issues).
"""
