"""The Sample page: base model + deltas -> checked prompt -> images (+ A&E attention maps).

Runs in the app's process, one request at a time, in a worker thread that reports its step. The
model of the last request (base + the same delta files) is reused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from app import deltas as dl
from app.methods import CONFIG_DIR, InputError

log = logging.getLogger(__name__)

# Words that look like a learnt token: <anything> or ending in * (v1*, *).
PLACEHOLDER_LIKE = re.compile(r"(?<![^\s,.;:!?(])(<[^\s<>]+>|[^\s,.;:!?()]*\*)(?=$|[\s,.;:!?)])")
# The toy world's words: what the toy base's text encoder was trained on (toyworld/captions.py).
TOY_GRAMMAR = {"a", "an", "photo", "of", "and", "with", "stripes", "dots", "outlined"}
# Attend-and-Excite on the toy base: the settings bench/toy_attend_excite.py tuned.
TOY_AE = {"attn_res": 8, "normalize_eot": True, "scale_factor": 2.5}


@dataclass(frozen=True)
class Base:
    name: str  # "toy" or "sd15"
    config: str  # model config name (configs/model/)
    ckpt: Path | None  # None: the config's own weights (the shipped toy base)

    @property
    def is_toy(self) -> bool:
        return self.name == "toy"

    def describe(self) -> str:
        if self.is_toy:
            return (
                "toy-world base (32x32 px images of coloured shapes; it knows only words like "
                "'a photo of a red circle and a blue square')"
            )
        return f"Stable Diffusion v1 ({self.ckpt})"


def toy_vocabulary() -> set[str]:
    from toyworld.world import COLOURS, SHAPES

    return TOY_GRAMMAR | set(COLOURS) | set(SHAPES)


def check_prompt(model, prompt: str, what: str = "Prompt", toy: bool = False) -> list[str]:
    """Raise :class:`InputError` for a prompt the text encoder would silently mangle; return
    warnings (words the toy base never saw)."""
    enc = model.cond_stage_model
    n = len(enc.tokenizer(prompt).input_ids)
    if n > enc.max_length:
        raise InputError(
            f"{what} is {n} tokens long (start and end tokens included), but the text encoder "
            f"reads at most {enc.max_length}: shorten it by {n - enc.max_length} tokens."
        )
    from ldm.modules.tokens import placeholder_tokens

    known = placeholder_tokens(enc)
    unknown = [w for w in PLACEHOLDER_LIKE.findall(prompt) if w not in known]
    if unknown:
        have = ", ".join(known) if known else "none (no delta selected)"
        raise InputError(
            f"{what}: unknown token {', '.join(dict.fromkeys(unknown))}: no selected delta defines "
            f"it. Tokens you can use: {have}."
        )
    if not toy:
        return []
    vocab = toy_vocabulary() | set(known)
    words = re.findall(r"[^\s,.;:!?()]+", prompt.lower())
    vocab |= {t.lower() for t in known}
    new = [w for w in dict.fromkeys(words) if w not in vocab]
    if new:
        return [
            f"The toy base never saw the word{'s' if len(new) > 1 else ''} {', '.join(new)}: "
            "its text encoder only knows toy-world captions, so expect it to be ignored."
        ]
    return []


def ae_settings(base: Base) -> dict[str, Any]:
    """The ``attend_excite`` block of configs/sample.yaml (the reference's settings), with the
    toy base's tuned values on the toy base."""
    block = OmegaConf.load(CONFIG_DIR / "sample.yaml")["attend_excite"]
    cfg = {k: v for k, v in OmegaConf.to_container(block).items() if k not in ("enabled", "figure")}
    cfg.pop("words", None), cfg.pop("token_indices", None)
    return {**cfg, **(TOY_AE if base.is_toy else {})}


def parse_words(text: str) -> list[str]:
    return [w for w in re.split(r"[,\s]+", text or "") if w]


@dataclass
class SampleState:
    status: str = "idle"  # idle, loading, sampling, done, error
    step: int = 0
    steps: int = 0
    message: str = ""
    warnings: list[str] = field(default_factory=list)
    result: dict[str, Any] | None = None
    started: float = 0.0

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


class SampleService:
    def __init__(self, base: Base, logs: Path) -> None:
        self.base = base
        self.logs = logs
        self.state = SampleState()
        self.lock = threading.Lock()
        self._model = None
        self._key: tuple | None = None

    # ------------------------------------------------------------- model
    def model_for(self, infos: list[dl.DeltaInfo], classes: list[str]):
        """The base with ``infos`` applied (cached for the same files)."""
        key = tuple((str(d.path), d.mtime) for d in infos) + (tuple(classes),)
        if key == self._key and self._model is not None:
            return self._model, self._merged
        self._model, self._key, self._merged = None, None, None
        from ldm import load_model

        dl.check_selection(infos)
        ckpt = str(self.base.ckpt) if self.base.ckpt else None
        if infos and infos[0].is_vico:
            model = self._vico_model(infos[0], ckpt)
            merged = None
        else:
            model = load_model(ckpt, config=self.base.config)
            merged = self._apply(model, infos, classes)
        self._model, self._key, self._merged = model, key, merged
        return model, merged

    def _apply(self, model, infos: list[dl.DeltaInfo], classes: list[str]):
        from custom.delta import apply_delta

        if not infos:
            return None
        if len(infos) == 1:
            apply_delta(model, infos[0].path)
            return None
        names = dl.rename_plan(infos)
        missing = [d.label for d, c in zip(infos, classes, strict=True) if not c]
        if missing:
            raise InputError(
                f"Merging needs the class word of every concept; give it for {', '.join(missing)}."
            )
        merged = dl.merged_delta(infos, names, classes, model, self.base.name)
        apply_delta(model, (merged.tensors, merged.meta))
        return merged

    def _vico_model(self, info: dl.DeltaInfo, ckpt: str | None):
        from ldm import load_model, resolve_model_config
        from vico.formats import apply_vico, model_overrides, read_vico

        tensors, meta = read_vico(info.path, None)
        cfg = {**resolve_model_config(self.base.config), **model_overrides(meta)}
        model = load_model(ckpt, config=cfg)
        found = model.weights_fingerprint(exclude=set(model.vico_parameters()))
        if meta.get("base_hash") and meta["base_hash"] != found:
            raise InputError(
                f"{info.label}: trained on base {meta['base_hash']}, this base is {found}."
            )
        apply_vico(model, tensors, info.label)
        return model

    # ------------------------------------------------------------- run
    def start(self, req: dict[str, Any], infos: list[dl.DeltaInfo]) -> None:
        if not self.lock.acquire(blocking=False):
            raise InputError("Sampling is already running: wait for it to finish.")
        self.state = SampleState(status="loading", started=time.time(), message="loading model")
        threading.Thread(target=self._run, args=(req, infos), daemon=True).start()

    def _run(self, req: dict[str, Any], infos: list[dl.DeltaInfo]) -> None:
        try:
            self.state.result = self.sample(req, infos)
            self.state.status, self.state.message = "done", "done"
        except InputError as exc:
            self.state.status, self.state.message = "error", str(exc)
        except Exception as exc:  # shown on the page; the app keeps running
            log.exception("sampling failed")
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self.state.status, self.state.message = "error", f"{type(exc).__name__}: {first}"
        finally:
            self.lock.release()

    def sample(self, req: dict[str, Any], infos: list[dl.DeltaInfo]) -> dict[str, Any]:
        from custom.delta import DeltaMismatchError

        prompt = " ".join(str(req.get("prompt") or "").split())
        negative = " ".join(str(req.get("negative_prompt") or "").split())
        if not prompt:
            raise InputError("Write a prompt, e.g. 'a photo of a red circle'.")
        n, steps, seed, guidance = _numbers(req)
        classes = [str(c or "").strip() for c in req.get("class_words") or []]
        classes += [""] * (len(infos) - len(classes))
        classes = [c or (d.class_word or "") for c, d in zip(classes, infos, strict=False)]
        reference = self._reference(req, infos)
        try:
            model, merged = self.model_for(infos, classes)
        except DeltaMismatchError as exc:
            text = str(exc).split(" (pass force")[0]
            for d in infos:
                text = text.replace(str(d.path), d.label)
            raise InputError(
                f"A delta does not fit this base model, so it was not applied: {text}. Sample it "
                "with the base it was trained on."
            ) from None
        warnings = check_prompt(model, prompt, "Prompt", self.base.is_toy)
        if negative:
            warnings += check_prompt(model, negative, "Negative prompt", False)
        self.state.warnings = warnings
        hook = None
        if req.get("attend_excite"):
            words = parse_words(req.get("words", ""))
            if not words:
                raise InputError("Attend-and-Excite needs words to excite, e.g. 'circle, square'.")
            from attend_excite import AttendExcite

            try:
                hook = AttendExcite.for_prompts(
                    model, [prompt] * n, words=words, **ae_settings(self.base)
                )
            except ValueError as exc:
                raise InputError(f"Attend-and-Excite: {exc}") from None
        return self._generate(model, merged, infos, prompt, negative, n, steps, seed, guidance,
                              hook, reference)  # fmt: skip

    def _reference(self, req: dict[str, Any], infos: list[dl.DeltaInfo]) -> Path | None:
        if not infos or not infos[0].is_vico:
            return None
        ref = req.get("reference")
        path = Path(ref) if ref else vico_reference(infos[0])
        if path is None or not path.is_file():
            raise InputError("ViCo needs a reference image of the concept: upload one.")
        return path

    def _generate(self, model, merged, infos, prompt, negative, n, steps, seed, guidance, hook,
                  reference) -> dict[str, Any]:  # fmt: skip
        from attend_excite import save_outputs
        from ldm.generate import generate
        from ldm.image_io import make_grid, to_pil

        out = self.logs / "app_samples" / time.strftime("%Y-%m-%d_%H-%M-%S")
        out.mkdir(parents=True, exist_ok=True)
        self.state.status, self.state.steps, self.state.message = "sampling", steps, "sampling"

        def progress(i, x, x0) -> None:
            self.state.step = i + 1

        ctx = contextlib.nullcontext()
        if reference is not None:  # ViCo: the reference image conditions both guidance halves
            ctx = model.visual_condition(str(reference), [prompt] * n)
        with ctx:
            batch = generate(model, [prompt] * n, negative_prompt=negative, steps=steps,
                             guidance_scale=guidance, seed=seed,
                             step_hooks=[hook] if hook else [], callback=progress,
                             progress=False)  # fmt: skip
        images = to_pil(batch)
        files = []
        for i, im in enumerate(images):
            path = out / f"{seed + i:05d}.png"
            im.save(path)
            files.append(path)
        make_grid(images).save(out / "grid.png")
        maps = []
        if hook is not None:
            stems = [f"attend_excite_{p.stem}" for p in files]
            written = save_outputs(hook, out, stems, images, True, image=[p.name for p in files])
            maps = [p for p in written if p.suffix == ".png"]
        delta_file = None
        if merged is not None:
            delta_file = merged.save(out / "merged_delta.safetensors")
        elif len(infos) == 1:
            delta_file = infos[0].path
        settings = {
            "base": self.base.name,
            "deltas": [str(d.path) for d in infos],
            "prompt": prompt,
            "negative_prompt": negative,
            "n": n,
            "steps": steps,
            "seed": seed,
            "guidance_scale": guidance,
            "attend_excite": hook.settings if hook else None,
            "words": [list(s.words) for s in hook.selections][:1] if hook else None,
            "tokens": _tokens(model),
        }
        (out / "settings.json").write_text(json.dumps(settings, indent=1))
        return {
            "dir": str(out),
            "images": [str(p) for p in files],
            "grid": str(out / "grid.png"),
            "maps": [str(p) for p in maps],
            "delta": str(delta_file) if delta_file else None,
            "delta_is_vico": bool(infos and infos[0].is_vico),
            "settings": settings,
            "seconds": round(time.time() - self.state.started, 1),
        }


def vico_reference(info: dl.DeltaInfo) -> Path | None:
    """The first training image of a ViCo run."""
    if info.run_dir is None:
        return None
    for sub in ("concept", "upload"):
        folder = info.run_dir / sub / "images"
        if folder.is_dir():
            files = sorted(folder.glob("*.png"))
            if files:
                return files[0]
    return None


def _tokens(model) -> list[str]:
    from ldm.modules.tokens import placeholder_tokens

    return placeholder_tokens(model.cond_stage_model)


def _numbers(req: dict[str, Any]) -> tuple[int, int, int, float]:
    try:
        n = int(req.get("n", 4))
        steps = int(req.get("steps", 50))
        seed = int(req.get("seed", 0))
        guidance = float(req.get("guidance", 5.0))
    except (TypeError, ValueError):
        msg = "Images, steps and seed must be whole numbers, guidance a number."
        raise InputError(msg) from None
    if not 1 <= n <= 16:
        raise InputError(f"Number of images must be 1 to 16 (got {n}).")
    if not 1 <= steps <= 500:
        raise InputError(f"Steps must be 1 to 500 (got {steps}).")
    if not 0 <= seed < 2**31:
        raise InputError("Seed must be between 0 and 2147483647.")
    if not 0 <= guidance <= 50:
        raise InputError(f"Guidance must be 0 to 50 (got {guidance}).")
    return n, steps, seed, guidance
