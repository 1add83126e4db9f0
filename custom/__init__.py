"""Custom Diffusion — "Multi-Concept Customization of Text-to-Image Diffusion", Kumari et al.,
CVPR 2023, arXiv:2212.04488.

Relative to LatentDiffusion it trains only the cross-attention K/V projections (plus new
``<newN>`` token rows), detaches the start token's K/V, and regularizes with real or generated
class images. Not implemented yet: this package is reserved for it (see the project's issues).
"""
