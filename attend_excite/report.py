"""What A&E saves beside each image: the per-step record (JSON) and an attention-map figure (PNG).

The figure is drawn with PIL only: one row per shown step, the image then one panel per chosen
token, each the token's smoothed attention map over the image, labelled with its maximum. One colour
scale serves the whole figure (black 0, white-hot its largest value, printed in the corner), so
tokens and steps compare: it shows whether every subject got a strongly attended patch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# Anchors of a dark-to-hot colour map (black, purple, red, orange, pale yellow).
_ANCHORS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64
)


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (h, w) -> uint8 RGB (h, w, 3) with the colour map above."""
    v = np.clip(values, 0.0, 1.0) * (len(_ANCHORS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_ANCHORS) - 2)
    frac = (v - lo)[..., None]
    rgb = _ANCHORS[lo] * (1 - frac) + _ANCHORS[lo + 1] * frac
    return rgb.round().astype(np.uint8)


def write_json(record: Mapping[str, Any], path: str | Path, **extra: Any) -> Path:
    """Write ``record`` (see ``AttendExcite.record``) plus ``extra`` fields as JSON."""
    path = Path(path)
    data = {**extra, **record}
    steps = data.pop("steps", [])
    head = json.dumps(data, indent=1)[:-2]  # one step per line keeps long runs readable
    body = ",\n".join(f"  {json.dumps(s)}" for s in steps)
    path.write_text(f'{head},\n "steps": [\n{body}\n ]\n}}\n')
    return path


def default_steps(steps: Sequence[int], max_iter_to_alter: int) -> list[int]:
    """Steps worth showing: first, every 10th, last altered, last measured."""
    have = sorted(steps)
    if not have:
        return []
    want = {have[0], have[-1], *range(0, have[-1] + 1, 10), max_iter_to_alter - 1}
    return [s for s in have if s in want]


def attention_figure(
    image: Image.Image,
    maps: Mapping[int, torch.Tensor],
    labels: Sequence[str],
    steps: Sequence[int] | None = None,
    max_iter_to_alter: int = 25,
    cell: int = 96,
) -> Image.Image:
    """Grid: rows = steps, columns = the image and one map (K, h, w) per token at that step."""
    steps = list(steps) if steps is not None else default_steps(list(maps), max_iter_to_alter)
    steps = [s for s in steps if s in maps]
    if not steps:
        raise ValueError("no attention maps recorded for the requested steps")
    font = ImageFont.load_default()
    head, side = 14, 56
    cols = 1 + len(labels)
    fig = Image.new("RGB", (side + cols * cell, head + len(steps) * (cell + head)), "white")
    draw = ImageDraw.Draw(fig)
    base = image.convert("RGB").resize((cell, cell), Image.BICUBIC)
    top = max(float(maps[s].max()) for s in steps) or 1.0
    draw.text((2, 1), f"0-{top:.2f}", fill="black", font=font)
    for c, text in enumerate(["image", *labels]):
        draw.text((side + c * cell + 4, 1), text[:14], fill="black", font=font)
    for r, step in enumerate(steps):
        y = head + r * (cell + head)
        draw.text((2, y + cell // 2 - 6), f"step {step}", fill="black", font=font)
        fig.paste(base, (side, y))
        token_maps = maps[step].float().numpy()
        for k in range(len(labels)):
            heat = Image.fromarray(colorize(token_maps[k] / top)).resize(
                (cell, cell), Image.BILINEAR
            )
            x0 = side + (k + 1) * cell
            fig.paste(Image.blend(base, heat, 0.75), (x0, y))
            draw.text(
                (x0 + 4, y + cell + 1), f"max {token_maps[k].max():.2f}", fill="black", font=font
            )
    return fig


def save_outputs(
    hook,
    outdir: str | Path,
    stems: Sequence[str],
    images: Sequence[Image.Image] | None = None,
    figure: bool = True,
    **extra: Any,
) -> list[Path]:
    """For image ``k`` of the last run of ``hook``: ``<stem>.json`` and (with ``figure`` and
    images) ``<stem>.png`` in ``outdir``; ``extra`` values that are lists are taken per image."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, stem in enumerate(stems):
        fields = {key: v[k] if isinstance(v, list) else v for key, v in extra.items()}
        paths.append(write_json(hook.record(k), outdir / f"{stem}.json", **fields))
        if figure and images is not None and hook.maps[k]:
            labels = hook.selections[k].labels()
            fig = attention_figure(images[k], hook.maps[k], labels, None, hook.max_iter_to_alter)
            fig.save(outdir / f"{stem}.png")
            paths.append(outdir / f"{stem}.png")
    return paths
