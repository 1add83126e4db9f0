"""Deltas on the Sample page: finding them, the tokens a selection gives, applying or merging
them onto the base, and exporting them in other tools' formats.

One delta is applied as it is (:func:`custom.delta.apply_delta`: base check, compressed deltas
expanded). Several are merged in closed form by :func:`custom.compose.compose` (each concept's
words keep their fine-tuned K/V outputs, ordinary captions keep the base's) after tokens that
repeat across deltas are renamed (``<new1>`` of the second delta becomes ``<new2>``). A ViCo
checkpoint (image blocks + a token) is sampled alone, with a reference image.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.methods import InputError

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("safetensors", "compvis", "adobe", "diffusers")
EXPORT_NAMES = {"compvis": "delta.ckpt", "adobe": "delta.bin", "diffusers": "diffusers"}


@dataclass
class DeltaInfo:
    path: Path
    label: str
    method: str
    tokens: list[str]
    step: int | None
    class_word: str | None
    run_dir: Path | None
    mtime: float

    @property
    def is_vico(self) -> bool:
        return self.method == "vico"

    def public(self, root: Path) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "rel": str(self.path.relative_to(root)) if self.path.is_relative_to(root) else None,
            "label": self.label,
            "method": self.method,
            "tokens": self.tokens,
            "step": self.step,
            "class_word": self.class_word,
            "mtime": self.mtime,
            # saved during training (step_N): listed only on request
            "intermediate": self.path.parent.name == "checkpoints" and self.path.stem != "last",
        }


def run_of(path: Path) -> Path | None:
    """The training run a delta belongs to (``<run>/checkpoints/<file>``), if any."""
    run = path.parent.parent
    return run if (run / ".hydra" / "config.yaml").is_file() else None


def class_word_of(run: Path | None) -> str | None:
    """The class phrase of a run's concept ("triangle" from "a photo of a <new1> triangle")."""
    if run is None:
        return None
    app_job = run / "app_job.json"
    if app_job.exists():
        word = json.loads(app_job.read_text()).get("class_word")
        if word:
            return str(word)
    try:
        from evaluation.prompts import concept_phrases
        from evaluation.runs import load_run

        info = load_run(run)
        return concept_phrases(info.instance_prompt, info.tokens)[1] or None
    except (OSError, ValueError, KeyError) as exc:
        log.debug("no class word for %s: %s", run, exc)
        return None


def delta_label(path: Path, run: Path | None) -> str:
    """ "Custom Diffusion (no regularization) · dotted_triangle · 11-26 04:38 · final"."""
    if run is None:
        if path.parent.parent.name == "app_samples":
            return f"merged on the Sample page · {path.parent.name}"
        return "/".join(path.parts[-3:]) if path.parent.name == "checkpoints" else path.name
    m = re.match(r"(\d{4})-(\d\d)-(\d\d)_(\d\d)-(\d\d)", run.name)
    when = f"{m[2]}-{m[3]} {m[4]}:{m[5]}" if m else run.name
    what = run.parent.parent.name if run.parent.name in ("runs", "multiruns") else run.parent.name
    job = run / "app_job.json"
    if job.exists():
        info = json.loads(job.read_text())
        what = f"{info.get('label', what)} · {info.get('concept') or 'your images'}"
    step = re.fullmatch(r"step_0*(\d+)", path.stem)
    file = "final" if path.stem == "last" else f"step {step[1]}" if step else path.stem
    return f"{what} · {when} · {file}"


def describe(path: Path) -> DeltaInfo:
    from ldm.checkpoint import read_metadata

    meta = read_metadata(path)
    if "delta_format" not in meta and meta.get("method") != "vico":
        raise ValueError(f"{path.name}: not a delta")
    run = run_of(path)
    tokens = json.loads(meta.get("tokens", "[]"))
    if meta.get("method") == "vico" and not tokens:
        tokens = [meta.get("placeholder", "*")]
    step = meta.get("step")
    return DeltaInfo(
        path=path,
        label=delta_label(path, run),
        method=meta.get("method", "?"),
        tokens=[str(t) for t in tokens],
        step=int(step) if step and step.isdigit() else None,
        class_word=class_word_of(run),
        run_dir=run,
        mtime=path.stat().st_mtime,
    )


def find_deltas(root: Path, max_depth: int = 6) -> list[DeltaInfo]:
    """Every delta below ``root`` (``*/checkpoints/*.safetensors`` and uploaded ones), newest
    first; files that are not deltas (whole-model weights) are skipped."""
    found = []
    for path in root.rglob("*.safetensors"):
        rel = path.relative_to(root)
        if len(rel.parts) > max_depth or not (
            path.parent.name in ("checkpoints", "deltas") or "app_samples" in rel.parts
        ):
            continue
        try:
            found.append(describe(path))
        except (OSError, ValueError) as exc:
            log.debug("skipping %s: %s", path, exc)
    return sorted(found, key=lambda d: d.mtime, reverse=True)


def rename_plan(infos: list[DeltaInfo]) -> list[list[str]]:
    """Per delta, its tokens after renaming repeats: the first keeps its names, a repeated
    ``<newK>`` becomes the next free ``<newN>``, another repeated token gets a ``_2`` suffix."""
    used: set[str] = set()
    taken = {t for d in infos for t in d.tokens}
    out = []
    for d in infos:
        names = []
        for tok in d.tokens:
            new = tok
            if tok in used:
                if tok.startswith("<new") and tok.endswith(">"):
                    k = 1
                    while f"<new{k}>" in used or f"<new{k}>" in taken:
                        k += 1
                    new = f"<new{k}>"
                else:
                    k = 2
                    while f"{tok}_{k}" in used or f"{tok}_{k}" in taken:
                        k += 1
                    new = f"{tok}_{k}"
            used.add(new)
            names.append(new)
        out.append(names)
    return out


def check_selection(infos: list[DeltaInfo]) -> None:
    vico = [d for d in infos if d.is_vico]
    if vico and len(infos) > 1:
        raise InputError(
            "A ViCo checkpoint is sampled on its own (it adds image blocks to the UNet): "
            "deselect the other deltas."
        )


def reg_captions(base: str, n: int = 200) -> list[str]:
    """Ordinary captions whose K/V outputs a merge must keep: toy-world captions on the toy
    base, generic photo captions otherwise."""
    if base == "toy":
        from toyworld.dataset import make_example

        return [make_example(i, 1, 8).caption for i in range(n)]
    things = ("dog", "cat", "person", "car", "house", "tree", "chair", "table", "flower", "bird",
              "mountain", "beach", "street", "room", "city", "cup", "book", "bicycle", "boat",
              "garden")  # fmt: skip
    templates = ("a photo of a {}", "a {} in the sun", "a painting of a {}", "a close-up of a {}",
                 "a {} on a white background", "an old {}", "a red {}", "a {} at night",
                 "a small {}", "a {} in the snow")  # fmt: skip
    return [t.format(w) for t in templates for w in things][:n]


def merged_delta(infos: list[DeltaInfo], names: list[list[str]], classes: list[str], model, base):
    """Merge several deltas for ``model`` (the base): a :class:`custom.formats.Delta`."""
    import torch

    from custom.base import check_base, full_values
    from custom.compose import KV, compose
    from custom.delta import make_metadata
    from custom.formats import ROWS, Delta

    deltas = []
    for info, tokens in zip(infos, names, strict=True):
        d = Delta.load(info.path)
        check_base(d, model, info.label)
        d = full_values(d, model)
        if ROWS not in d.tensors:
            raise InputError(f"{info.label}: has no token rows, so it cannot be merged.")
        deltas.append(Delta(d.tensors, tokens, d.meta))
    tokens = [t for n in names for t in n]
    if any(KV.search(k) for d in deltas for k in d.tensors):
        categories = [c for c, n in zip(classes, names, strict=True) for _ in n]
        merged, report = compose(deltas, model, categories, reg_captions(base))
        log.info("merged %d deltas: max constraint residual %s", len(deltas),
                 report["max_constraint_residual"])  # fmt: skip
        return merged
    # Token rows only (Cross Initialization): nothing to solve, the rows are stacked.
    rows = torch.cat([d.tensors[ROWS] for d in deltas])
    meta = make_metadata(model.weights_fingerprint(exclude=[ROWS]), tokens, "merged")
    return Delta({ROWS: rows}, tokens, meta)


def export(path: Path, fmt: str, out_dir: Path, base_config: str, base_ckpt: str | None) -> Path:
    """``path`` (a delta) in ``fmt``; a diffusers folder is zipped. Returns the file to send."""
    from custom.compress import is_compressed
    from custom.formats import Delta
    from custom.formats import export as write

    if fmt not in EXPORT_FORMATS:
        raise InputError(f"Unknown format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}.")
    if fmt == "safetensors":
        return path
    delta = Delta.load(path) if _is_delta(path) else None
    if delta is None:
        raise InputError(
            f"{path.name} is a ViCo checkpoint: it downloads as .safetensors only (convert with "
            "vico.formats for the reference layout)."
        )
    from ldm import resolve_model_config

    params = resolve_model_config(base_config)["unet_config"]["params"]
    if fmt != "compvis" and is_compressed(delta.meta):  # these formats hold full weights
        from custom.base import full_values, load_base

        delta = full_values(delta, load_base(base_ckpt, base_config))
    out_dir.mkdir(parents=True, exist_ok=True)
    run = run_of(path)
    stem = f"{run.name}_{path.stem}" if run else path.stem
    target = out_dir / f"{stem}_{EXPORT_NAMES[fmt]}"
    written = write(delta, fmt, target, params, overwrite=True)
    if fmt == "diffusers":
        return Path(shutil.make_archive(str(target), "zip", root_dir=written))
    return written


def _is_delta(path: Path) -> bool:
    from ldm.checkpoint import read_metadata

    meta = read_metadata(path)
    return "delta_format" in meta and meta.get("method") != "vico"
