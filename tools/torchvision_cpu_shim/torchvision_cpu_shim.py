"""Lets PyPI's torchvision 0.28.0 wheel (built against CUDA torch) import beside CPU torch 2.13.

Its ``_C.so`` links ``libtorch_cuda.so``, so its C++ ops do not load, and
``torchvision/_meta_registrations.py`` then fails on ``register_fake("torchvision::nms")`` with
``RuntimeError: operator torchvision::nms does not exist``. pytorch_lightning, transformers and
open_clip import torchvision optionally but catch only ImportError, so they break too.

When ``torchvision`` is first imported, this module tries the wheel's own ``_C*.so``; only if
that fails does it define the two op schemas torchvision registers fakes for (``nms``,
``qnms``), with a pure-PyTorch CPU ``nms``. The pure-Python parts of torchvision (transforms,
models, utils) then work; its C++ ops (``torchvision.ops.roi_align``, ``torchvision.io``
decoding, ...) stay unavailable. With a matching torchvision build it does nothing. It is
loaded from a ``.pth`` file as a lazy meta-path hook, so no interpreter imports torch early.
"""

from __future__ import annotations

import glob
import importlib.abc
import importlib.util
import os
import sys

_LIBRARY = None  # keeps the op definitions alive


def _nms(dets, scores, iou_threshold: float):
    import torch

    if dets.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=dets.device)
    x1, y1, x2, y2 = dets.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    suppressed = torch.zeros(dets.shape[0], dtype=torch.bool, device=dets.device)
    keep = []
    for i in scores.argsort(descending=True).tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
        inter = w * h
        suppressed |= inter / (areas[i] + areas - inter) > iou_threshold
    return torch.tensor(keep, dtype=torch.long, device=dets.device)


def define_ops() -> bool:
    """Define the ops unless torchvision's own library loads; True if the shim was needed."""
    global _LIBRARY
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations or _LIBRARY is not None:
        return False
    import torch

    folder = list(spec.submodule_search_locations)[0]
    for lib in sorted(glob.glob(os.path.join(folder, "_C*.so"))):
        try:
            torch.ops.load_library(lib)
            return False  # a matching build: its own ops are registered
        except (OSError, ImportError, RuntimeError):
            pass
    # Defining them beside a working torchvision would crash ("registered multiple times").
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.impl("nms", _nms, "CPU")
    return True


class _FirstImportHook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            define_ops()
        return None  # the normal finders import torchvision itself


def install() -> None:
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _FirstImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _FirstImportHook())


install()
