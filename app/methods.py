"""The Train page's methods, read from ``app/methods.yaml``: an entry is offered only when its
recipe exists in ``configs/``, so methods appear as their recipes land. Turns a training request
into the ``main.py`` command line (recipe + Hydra overrides)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
METHODS_FILE = Path(__file__).with_name("methods.yaml")
APP_CONFIGS = Path(__file__).with_name("configs")
CLASS_WORD = re.compile(r"^[a-z][a-z -]{0,39}$")
BASES = ("toy", "sd15")


class InputError(ValueError):
    """Bad user input: the message is shown on the page as it is."""


@dataclass(frozen=True)
class Method:
    """One ``methods.yaml`` entry (see the comment at its top)."""

    recipe: str
    label: str
    about: str
    token: str
    prompt: str
    lr: str
    overrides: tuple[str, ...]
    concept: tuple[str, ...]
    images: tuple[str, ...]
    sd_recipe: str | None = None
    sd_overrides: tuple[str, ...] | None = None
    sd_images: tuple[str, ...] | None = None
    bases: tuple[str, ...] = BASES
    class_words: str | None = None  # "toy_shapes": the class word must be a toy-world shape
    single_token_class: bool = False  # the class word initialises a token: one CLIP token
    defaults: dict[str, Any] = field(default_factory=dict)
    recipe_cfg: Any = None  # the composed recipe (DictConfig), to leave out unchanged overrides

    def recipe_for(self, base: str) -> str:
        return self.sd_recipe if base != "toy" and self.sd_recipe else self.recipe

    def public(self) -> dict[str, Any]:
        """What the page needs to know."""
        return {
            "id": self.recipe,
            "label": self.label,
            "about": self.about,
            "token": self.token,
            "prompt": self.prompt,
            "class_words": self.class_words,
            **{k: v for k, v in self.defaults.items() if k != "sample_prompts"},
        }


def _tuple(value: Any) -> tuple[str, ...] | None:
    return None if value is None else tuple(str(v) for v in value)


def load_methods(
    path: Path = METHODS_FILE, config_dir: Path = CONFIG_DIR, base: str = "toy"
) -> list[Method]:
    """The entries of ``path`` whose recipe (for ``base``) exists in ``config_dir``."""
    entries = OmegaConf.to_container(OmegaConf.load(path), resolve=False)["methods"]
    out = []
    for e in entries:
        m = Method(
            recipe=e["recipe"],
            label=e["label"],
            about=e.get("about", ""),
            token=e["token"],
            prompt=e.get("prompt", "a photo of a {token} {class_word}"),
            lr=e["lr"],
            overrides=_tuple(e.get("overrides", [])),
            concept=_tuple(e.get("concept", [])),
            images=_tuple(e.get("images", [])),
            sd_recipe=e.get("sd_recipe"),
            sd_overrides=_tuple(e.get("sd_overrides")),
            sd_images=_tuple(e.get("sd_images")),
            bases=tuple(e.get("bases", BASES)),
            class_words=e.get("class_words"),
            single_token_class=bool(e.get("single_token_class", False)),
        )
        if base in m.bases and (config_dir / f"{m.recipe_for(base)}.yaml").is_file():
            out.append(m)
    return out


def compose_recipe(recipe: str, config_dir: Path = CONFIG_DIR):
    """The recipe's config as ``main.py`` would compose it (no Hydra runtime values)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(recipe)


def select(cfg, key: str) -> Any:
    """A value of a composed config as plain Python; None when missing or unresolvable here."""
    value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    if OmegaConf.is_config(value):
        try:
            return OmegaConf.to_container(value, resolve=True)
        except Exception:  # an interpolation of Hydra's runtime: not resolvable outside a run
            return OmegaConf.to_container(value, resolve=False)
    return value


def recipe_defaults(cfg, lr_key: str) -> dict[str, Any]:
    """Steps, learning rate, batch size, ``scale_lr``, concept and class word of a recipe."""
    from toyworld.concepts import CONCEPTS

    concept = select(cfg, "concept") or select(cfg, "prepare.concept.name")
    word = select(cfg, "class_word")
    if word is None and concept in CONCEPTS:
        word = CONCEPTS[concept].class_word
    return {
        "steps": select(cfg, "trainer.max_steps"),
        "lr": select(cfg, lr_key),
        "batch_size": select(cfg, "data.batch_size"),
        "scale_lr": bool(select(cfg, "model.scale_lr")),
        "concept": concept,
        "class_word": word,
        "sample_prompts": select(cfg, "callbacks.log_samples.prompts") or [],
    }


def with_defaults(
    methods: Sequence[Method], base: str = "toy", config_dir: Path = CONFIG_DIR
) -> list[Method]:
    """``methods`` with their recipe's defaults filled in (composing each recipe once)."""
    out = []
    for m in methods:
        cfg = compose_recipe(m.recipe_for(base), config_dir)
        d = recipe_defaults(cfg, m.lr)
        out.append(Method(**{**m.__dict__, "defaults": d, "recipe_cfg": cfg}))
    return out


def quote(value: Any) -> str:
    """A Hydra override value: numbers as they are, strings single-quoted."""
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "null"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def check_class_word(word: str, method: Method, base: str, tokenizer=None) -> str:
    """The class word, normalised; :class:`InputError` with a readable reason otherwise."""
    word = " ".join(str(word or "").lower().split())
    if not word:
        raise InputError("Class word missing: say what the concept is, e.g. 'dog' or 'triangle'.")
    if not CLASS_WORD.match(word):
        raise InputError(
            f"Class word {word!r}: use letters, spaces and hyphens only (at most 40), e.g. 'dog'."
        )
    if method.class_words == "toy_shapes" and base == "toy":
        from toyworld.world import SHAPES

        if word not in SHAPES:
            raise InputError(
                f"{method.label} on the toy base takes its regularization images from the toy "
                f"world, so the class word must be one of its shapes: {', '.join(SHAPES)}."
            )
    if method.single_token_class and tokenizer is not None:
        pieces = tokenizer.tokenize(word)
        if len(pieces) != 1:
            raise InputError(
                f"{method.label} starts its token from the class word, which must be one CLIP "
                f"token; {word!r} is {len(pieces)} ({' '.join(pieces)})."
            )
    return word


@dataclass
class TrainRequest:
    method: Method
    base: str  # "toy" or "sd15"
    class_word: str
    steps: int
    lr: float
    run_dir: Path
    concept: str | None = None  # a bundled toy concept, or
    images_dir: Path | None = None  # a folder of uploaded images
    preview_every: int = 0
    sd_ckpt: Path | None = None


def sample_prompts(method: Method, class_word: str) -> list[str]:
    """The recipe's sample prompts with its class word replaced by ``class_word``."""
    old = method.defaults.get("class_word")
    prompts = list(method.defaults.get("sample_prompts") or [])
    if not old or old == class_word:
        return prompts
    return [re.sub(rf"\b{re.escape(old)}\b", class_word, p) for p in prompts]


def fields(req: TrainRequest) -> dict[str, str]:
    m = req.method
    token_prompt = m.prompt.format(token=m.token, class_word=req.class_word)
    samples = sample_prompts(m, req.class_word)
    values = {
        "concept": req.concept,
        "images": str(req.images_dir) if req.images_dir else None,
        "class_word": req.class_word,
        "token": m.token,
        "concept_prompt": token_prompt,
        "class_prompt": f"a photo of a {req.class_word}",
        "phrase": "{} " + req.class_word,
    }
    out = {k: quote(v) for k, v in values.items() if v is not None}
    out["samples"] = "[" + ",".join(quote(p) for p in samples) + "]"
    return out


def changed(overrides: Sequence[str], cfg) -> list[str]:
    """``overrides`` without those that set a value the composed recipe ``cfg`` already has
    (so a run's recorded overrides, and the labels made from them, say only what changed)."""
    if cfg is None:
        return list(overrides)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [
        text
        for text, o in zip(overrides, parsed, strict=True)
        if o.is_add() or o.is_delete() or select(cfg, o.key_or_group) != o.value()
    ]


def command(req: TrainRequest) -> list[str]:
    """The ``main.py`` argv (after the interpreter) for ``req``."""
    m, sd = req.method, req.base != "toy"
    if (req.concept is None) == (req.images_dir is None):
        raise InputError("Choose a bundled concept or upload images (one of the two).")
    if sd and req.concept is not None:
        raise InputError("Bundled concepts are toy-world images: upload photos for SD.")
    values = fields(req)
    overrides = list(m.sd_overrides if sd and m.sd_overrides is not None else m.overrides)
    if req.concept is not None:
        overrides += m.concept
    else:
        overrides += m.sd_images if sd and m.sd_images is not None else m.images
    args = [o.format(**values) for o in overrides]
    args += [f"trainer.max_steps={int(req.steps)}", f"{m.lr}={float(req.lr)!r}"]
    if req.preview_every:
        args += [
            f"callbacks.log_samples.every_n_steps={int(req.preview_every)}",
            f"callbacks.save_weights.every_n_steps={int(req.preview_every)}",
        ]
    args = changed(args, m.recipe_cfg)
    if sd:
        args += ["model=sd15", f"model.ckpt={quote(str(req.sd_ckpt))}", "resolution=512"]
    args += [
        f"hydra.run.dir={quote(str(req.run_dir))}",
        f"hydra.searchpath=[{quote('file://' + str(APP_CONFIGS))}]",
        "+app=progress",  # app/configs/app/progress.yaml: the progress callback
    ]
    return ["main.py", "--config-name", m.recipe_for(req.base), *args]


def check_numbers(steps: Any, lr: Any, preview_every: Any) -> tuple[int, float, int]:
    try:
        steps, lr = int(steps), float(lr)
        preview_every = int(preview_every or 0)
    except (TypeError, ValueError):
        raise InputError("Steps and preview interval must be whole numbers, lr a number.") from None
    if not 1 <= steps <= 100_000:
        raise InputError(f"Steps must be between 1 and 100000 (got {steps}).")
    if not 0 < lr < 1:
        raise InputError(f"Learning rate must be between 0 and 1 (got {lr}).")
    if preview_every < 0:
        raise InputError("Preview interval must be 0 (only at the end) or more.")
    return steps, lr, preview_every
