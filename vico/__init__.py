"""ViCo — "ViCo: Plug-and-play Visual Condition for Personalized Text-to-image Generation",
Hao et al., 2023, arXiv:2306.00971.

Relative to LatentDiffusion it keeps the UNet frozen (its state dict stays SD's) and trains one
placeholder token ``*`` plus image cross-attention blocks after every second decoder transformer;
a reference image runs through the same UNet as a second stream, and the Otsu-thresholded
attention map of ``*`` on it masks what the image blocks attend to.

``model.py`` (``ViCo``), ``hooks.py`` (two-stream forward: ``ViCoProcessor``, block hooks, layer
rule), ``modules.py`` (``ImageCrossAttention``, ``otsu_mask``, regularizer), ``data.py``
(concept images with reference images), ``formats.py`` (our ``.safetensors`` and the reference's
``embeddings_gs-N.pt`` / ``cross_attention-N.pt``), ``sampling.py`` (``sample.py vico.ckpt=...
vico.image=...``), ``callbacks.py``; ``python -m vico to-reference|from-reference``. Recipe:
``configs/finetune_vico.yaml``; benchmark: ``bench/toy_vico.py``.
"""
