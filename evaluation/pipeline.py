"""One run's evaluation: prompts -> images (fixed seeds and names) -> scores -> metrics.json.

Images go to ``<outdir>/samples/<prompt slug>/<seed>.png``; image j of every prompt uses seed
``seed + j``. Seeds are sampled in fixed chunks of ``batch_size`` (with ``eta > 0`` a chunk's
noise depends on its batch), and a chunk whose files all exist is not sampled again.
``sampling.json`` records what the images depend on (weights file, sampler, guidance, batch);
reusing an ``outdir`` with other settings is refused, so stale images never get scored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from evaluation import prompts as prompt_lib
from evaluation.runs import RunInfo, build_model, list_images, load_run
from evaluation.scorers import Context, Sample, Scorer, mean_or_none

log = logging.getLogger(__name__)


def slug(prompt: str, max_len: int = 60) -> str:
    """A file-name-safe, stable folder name for a prompt (text plus a short hash)."""
    text = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:max_len].strip("-")
    return f"{text or 'prompt'}-{hashlib.sha1(prompt.encode()).hexdigest()[:6]}"


def sampling_settings(cfg: DictConfig, run: RunInfo) -> dict[str, Any]:
    weights = None
    if run.weights is not None:
        stat = run.weights.stat()
        weights = f"{run.weights.name}:{stat.st_size}:{stat.st_mtime_ns}"  # survives a move
    return {
        "weights": weights,
        "sampler": OmegaConf.to_container(cfg.sampler, resolve=True),
        "guidance_scale": float(cfg.guidance_scale),
        "negative_prompt": str(cfg.negative_prompt),
        "batch_size": int(cfg.batch_size),
    }


def check_settings(outdir: Path, settings: Mapping[str, Any]) -> None:
    """Record ``settings`` in ``outdir/sampling.json``; refuse a folder made with others."""
    path = outdir / "sampling.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise ValueError(
                f"{outdir} holds images sampled with other settings ({', '.join(diff)}): "
                "delete it or set outdir="
            )
    outdir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))


def sample_prompts(
    load: Callable[[], Any], prompts: Sequence[prompt_lib.Prompt], outdir: Path, cfg: DictConfig
) -> list[list[Sample]]:
    """Sample every prompt (skipping chunks whose images exist; the model is built by ``load``
    at the first missing chunk); returns the samples per prompt."""
    from ldm.generate import generate
    from ldm.image_io import to_pil

    out, made, kept, model = [], 0, 0, None
    for p in prompts:
        folder = outdir / "samples" / slug(p.prompt)
        seeds = [cfg.seed + j for j in range(cfg.n_samples)]
        for start in range(0, len(seeds), cfg.batch_size):
            chunk = seeds[start : start + cfg.batch_size]
            paths = [folder / f"{s:05d}.png" for s in chunk]
            if all(path.exists() for path in paths):
                kept += len(paths)
                continue
            model = model if model is not None else load()
            images = generate(
                model,
                [p.prompt] * len(chunk),
                negative_prompt=cfg.negative_prompt,
                sampler=cfg.sampler.name,
                steps=cfg.sampler.steps,
                eta=cfg.sampler.get("eta", 0.0),
                guidance_scale=cfg.guidance_scale,
                seed=chunk[0],
                progress=False,
            )
            folder.mkdir(parents=True, exist_ok=True)
            for image, path in zip(to_pil(images), paths, strict=True):
                image.save(path)
            made += len(paths)
        out.append([Sample(folder / f"{s:05d}.png", p.prompt, p.text, p.kind, s) for s in seeds])
    log.info("sampled %d images, kept %d existing, in %s", made, kept, outdir / "samples")
    return out


def score(
    scorers: Mapping[str, Scorer],
    samples: Sequence[Sample],
    targets: Sequence[Path],
    context: Context,
) -> dict[str, list[float | None]]:
    """Every scorer on every sample: ``{metric: [value per sample]}``."""
    values: dict[str, list[float | None]] = {}
    for name, scorer in scorers.items():
        for metric, vals in scorer(samples, targets, context).items():
            if len(vals) != len(samples):
                raise ValueError(f"scorer {name}: {len(vals)} {metric} values for {len(samples)}")
            values[metric] = [None if v is None else round(float(v), 6) for v in vals]
    return values


def aggregate(values: Mapping[str, list], index: Sequence[int]) -> dict[str, float | None]:
    return {m: mean_or_none([vals[i] for i in index]) for m, vals in values.items()}


def summary(agg: Mapping[str, Mapping], scorers: Mapping[str, Scorer]) -> dict[str, dict]:
    """Per scorer, its image alignment over the ``concept`` prompts and its text alignment over
    the ``align`` prompts (where the prompt asks for more than the concept) if it scored any,
    else over the ``concept`` prompts (CustomConcept101: all prompts are concept prompts)."""
    out = {}
    for name, s in scorers.items():
        entry: dict[str, Any] = {}
        if s.image_metric:
            entry["image_metric"] = s.image_metric
            entry["image"] = agg.get("concept", {}).get(s.image_metric)
        if s.text_metric:
            kind = "align" if agg.get("align", {}).get(s.text_metric) is not None else "concept"
            entry.update(
                text_metric=s.text_metric,
                text_prompts=kind,
                text=agg.get(kind, {}).get(s.text_metric),
            )
        out[name] = entry
    return out


def resolve_phrases(cfg: DictConfig, run: RunInfo, source: prompt_lib.PromptSource):
    if cfg.concept_phrase:
        concept = str(cfg.concept_phrase)
        cls = str(cfg.class_phrase or prompt_lib.concept_phrases(concept, run.tokens)[1])
        return concept, cls
    if run.instance_prompt:
        concept, cls = prompt_lib.concept_phrases(run.instance_prompt, run.tokens)
    elif source.concept_phrase:
        concept, cls = prompt_lib.concept_phrases(source.concept_phrase, run.tokens)
    else:
        raise ValueError("no concept phrase: the run has no instance prompt; set concept_phrase=")
    return concept, str(cfg.class_phrase or cls)


def resolve_targets(cfg: DictConfig, run: RunInfo, source: prompt_lib.PromptSource) -> list[Path]:
    """``targets=``, else the run's instance images, else the CustomConcept101 concept's."""
    if cfg.targets:
        return list_images(cfg.targets)
    for folder in (run.instance_dir, source.targets):
        if folder is not None and Path(folder).is_dir():
            return list_images(folder)
    log.warning("no training images found: image alignment is left out (set targets=)")
    return []


def evaluate_run(
    cfg: DictConfig, run_dir: str | Path, scorers: Mapping[str, Scorer], device
) -> dict[str, Any]:
    """Sample, score and write ``metrics.json`` + ``report.html`` for one run; returns metrics."""
    from evaluation.report import write_report

    run = load_run(run_dir, cfg.weights)
    source = prompt_lib.resolve(str(cfg.prompts), cfg.customconcept101_dir, run.toy_concept)
    concept, cls = resolve_phrases(cfg, run, source)
    prompts = prompt_lib.expand(source, concept, cls)
    targets = resolve_targets(cfg, run, source)
    outdir = Path(cfg.outdir) if cfg.outdir else run.dir / "eval" / source.name
    check_settings(outdir, sampling_settings(cfg, run))
    log.info(
        "evaluating %s (%s): %d prompts x %d seeds -> %s",
        run.dir,
        run.label,
        len(prompts),
        cfg.n_samples,
        outdir,
    )
    per_prompt = sample_prompts(lambda: build_model(run, device), prompts, outdir, cfg)
    flat = [s for group in per_prompt for s in group]
    values = score(scorers, flat, targets, Context(run.toy_concept, run.tokens))
    rows, offset = [], 0
    for p, group in zip(prompts, per_prompt, strict=True):
        index = range(offset, offset + len(group))
        offset += len(group)
        rows.append(
            {
                "prompt": p.prompt,
                "text": p.text,
                "kind": p.kind,
                "images": [str(s.path.relative_to(outdir)) for s in group],
                "metrics": aggregate(values, index),
                "per_image": {m: [vals[i] for i in index] for m, vals in values.items()},
            }
        )
    kinds = {k: [i for i, s in enumerate(flat) if s.kind == k] for k in prompt_lib.KINDS}
    agg = {k: {**aggregate(values, idx), "n_images": len(idx)} for k, idx in kinds.items() if idx}
    metrics = {
        "run": str(run.dir),
        "label": run.label,
        "method": run.method,
        "step": run.step,
        "weights": str(run.weights) if run.weights else None,
        "report": str(outdir / "report.html"),
        "prompts": str(cfg.prompts),
        "concept_phrase": concept,
        "class_phrase": cls,
        "toy_concept": run.toy_concept,
        "n_samples": int(cfg.n_samples),
        "seed": int(cfg.seed),
        "sampling": sampling_settings(cfg, run),
        "targets": [str(t) for t in targets],
        "aggregate": agg,
        "summary": summary(agg, scorers),
        "per_prompt": rows,
    }
    (outdir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    write_report(outdir, metrics, run.config, cfg)
    log.info("wrote %s and report.html", outdir / "metrics.json")
    return metrics
