"""Sample images: ``python sample.py [model=sd15 ckpt=...] [delta=D] prompt="..." n_samples=4``.

``delta`` (a Custom Diffusion ``.safetensors`` delta) adds its tokens and weights to the base
first; one trained on another base is refused unless ``force_delta=true``.
``embeddings`` (learned token vectors: Cross Initialization's ``learned_embeds.bin`` /
``.safetensors``, a textual-inversion file or folder) adds their tokens after any delta.
``attend_excite.enabled=true attend_excite.words=[cat,dog]`` (or ``sampler=attend_excite``) adds
the Attend-and-Excite step hook and writes ``attend_excite_<seed>.json`` / ``.png`` per image.
``vico.ckpt=CKPT vico.image=ref.png prompt="a * on the beach"`` samples a ViCo concept with the
reference image as the visual condition (``vico/sampling.py``); it combines with A&E.

Writes one PNG per image (``<seed>.png``) and ``grid.png`` into the run folder under ``logs/``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from attend_excite import from_config as ae_hook  # noqa: E402
from attend_excite import save_outputs  # noqa: E402
from ldm import load_model  # noqa: E402
from ldm.generate import generate  # noqa: E402
from ldm.image_io import make_grid, to_pil  # noqa: E402
from ldm.util import default_device  # noqa: E402
from vico import sampling as vico  # noqa: E402

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> list[Path]:
    device = default_device() if cfg.device == "auto" else torch.device(cfg.device)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    try:
        vico_ckpt = vico.read_config(cfg.get("vico"))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    model = load_model(cfg.ckpt, config=vico.model_config(model_cfg, vico_ckpt), device=device)
    try:
        vico.attach(model, vico_ckpt)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if cfg.get("delta"):
        from custom.delta import DeltaMismatchError, apply_delta

        try:
            apply_delta(model, cfg.delta, force=cfg.force_delta)
        except DeltaMismatchError as exc:
            raise SystemExit(f"error: {exc}") from None
    if cfg.get("embeddings"):
        from cross_init.embeddings import apply_embeddings

        try:
            apply_embeddings(model, cfg.embeddings)
        except (ValueError, FileNotFoundError) as exc:
            raise SystemExit(f"error: {exc}") from None
    outdir = Path(cfg.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths, images = [], []
    for start in range(0, cfg.n_samples, cfg.batch_size):
        n = min(cfg.batch_size, cfg.n_samples - start)
        ae = ae_hook(model, [cfg.prompt] * n, cfg.attend_excite) if "attend_excite" in cfg else None
        with vico.condition(model, cfg.get("vico"), [cfg.prompt] * n, cfg.seed):
            batch = generate(
                model,
                [cfg.prompt] * n,
                negative_prompt=cfg.negative_prompt,
                sampler=cfg.sampler.name,
                steps=cfg.sampler.steps,
                eta=cfg.sampler.eta,
                guidance_scale=cfg.guidance_scale,
                seed=cfg.seed + start,
                step_hooks=[ae] if ae is not None else [],
            )
        for i, image in enumerate(to_pil(batch)):
            path = outdir / f"{cfg.seed + start + i:05d}.png"
            image.save(path)
            paths.append(path)
            images.append(image)
        if ae is not None:
            names = [p.name for p in paths[-n:]]
            stems = [f"attend_excite_{p.stem}" for p in paths[-n:]]
            save_outputs(ae, outdir, stems, images[-n:], cfg.attend_excite.figure, image=names)
    make_grid(images).save(outdir / "grid.png")
    OmegaConf.save(cfg, outdir / "sample_config.yaml")
    log.info("wrote %d images and grid.png to %s", len(paths), outdir)
    return paths


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
