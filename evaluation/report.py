"""``report.html`` for one evaluated run: metric tables, a sample grid per prompt beside the
training images, and the run's and the evaluation's configs. Static HTML with relative links
(no script, no external resources), so the folder can be moved or served as is."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from PIL import Image

THUMB = 160  # grid cells larger than this are downscaled (the full images stay in samples/)
MIN_SHOWN = 96  # smaller images are shown enlarged (pixelated) to at least this size

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1400px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; } h3 { font-size: 15px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; } tr.prior td { color: #666; } tr.align td { color: #225; }
.row { display: flex; flex-wrap: wrap; gap: 12px 24px; align-items: flex-start; }
figure { margin: 0; } figcaption { color: #555; font-size: 12px; }
img.grid { image-rendering: pixelated; border: 1px solid #ddd; }
pre { background: #f7f7f7; padding: 8px; overflow-x: auto; font-size: 12px; }
section.prompt { border-top: 1px solid #eee; padding-top: 6px; }
"""


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def metric_names(metrics: Mapping[str, Any]) -> list[str]:
    names: dict[str, None] = {}
    for row in metrics["per_prompt"]:
        names.update(dict.fromkeys(row["metrics"]))
    return list(names)


def thumbnails(images: Sequence[Image.Image], size: int) -> list[Image.Image]:
    out = []
    for im in images:
        im = im.convert("RGB")
        w, h = im.size
        side = min(w, h)
        im = im.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2))
        out.append(im.resize((size, size), Image.BICUBIC) if side != size else im)
    return out


def write_grid(paths: Sequence[Path], out: Path, size: int | None = None, ncols: int = 8) -> int:
    """A grid PNG of ``paths`` (square thumbnails); returns its display scale factor."""
    from ldm.image_io import make_grid

    images = []
    for p in paths:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    side = size or min(images[0].size)
    side = min(side, THUMB)
    grid = make_grid(thumbnails(images, side), ncols=min(ncols, len(images)))
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return max(1, -(-MIN_SHOWN // side))


def img_tag(src: str, path: Path, scale: int, alt: str) -> str:
    with Image.open(path) as im:
        w, h = im.size
    return (
        f'<img class="grid" src="{html.escape(src)}" width="{w * scale}" '
        f'height="{h * scale}" alt="{html.escape(alt)}">'
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], classes=()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if i < len(classes) and classes[i] else ""
        cells = "".join(
            f'<td class="num">{fmt(v)}</td>'
            if isinstance(v, int | float) or v is None
            else f"<td>{fmt(v)}</td>"
            for v in row
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def page(title: str, body: str) -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<link rel="icon" href="data:,">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n"
        f"<body>\n{body}\n</body></html>\n"
    )


def yaml_block(title: str, cfg: DictConfig | Mapping, open_: bool = False) -> str:
    text = OmegaConf.to_yaml(cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg))
    return (
        f"<details{' open' if open_ else ''}><summary>{html.escape(title)}</summary>"
        f"<pre>{html.escape(text)}</pre></details>"
    )


def write_report(
    outdir: Path, metrics: Mapping[str, Any], run_config: DictConfig, eval_config: DictConfig
) -> Path:
    """Write ``outdir/report.html`` (and its grid PNGs) from ``metrics``."""
    names = metric_names(metrics)
    targets = [Path(t) for t in metrics["targets"]]
    first = outdir / metrics["per_prompt"][0]["images"][0]
    with Image.open(first) as im:
        size = min(im.size)
    target_html = "<p>No training images.</p>"
    if targets:
        scale = write_grid(targets, outdir / "targets.png", size=size, ncols=4)
        target_html = img_tag("targets.png", outdir / "targets.png", scale, "training images")
    meta_rows = [
        ("run", metrics["run"]),
        ("method", metrics["method"]),
        ("step", metrics["step"]),
        ("weights", metrics["weights"]),
        ("prompts", metrics["prompts"]),
        ("concept phrase", metrics["concept_phrase"]),
        ("class phrase", metrics["class_phrase"]),
        ("images per prompt", metrics["n_samples"]),
        ("seeds", f"{metrics['seed']}…{metrics['seed'] + metrics['n_samples'] - 1}"),
        ("sampler", ", ".join(f"{k} {v}" for k, v in metrics["sampling"]["sampler"].items())),
        ("guidance", metrics["sampling"]["guidance_scale"]),
        ("training images", len(targets)),
    ]
    parts = [
        f"<h1>Evaluation: {html.escape(metrics['label'])}</h1>",
        '<table class="meta"><tbody>'
        + "".join(f"<tr><td>{html.escape(k)}</td><td>{fmt(v)}</td></tr>" for k, v in meta_rows)
        + "</tbody></table>",
    ]
    agg = metrics["aggregate"]
    parts.append("<h2>Aggregate</h2>")
    parts.append(
        table(
            ["prompts", *names, "images"],
            [[k, *[agg[k].get(n) for n in names], agg[k]["n_images"]] for k in agg],
        )
    )
    parts.append(
        "<p>concept: the run's concept; align: the concept and more (a second object, "
        "another colour); prior: the class word alone.</p>"
    )
    parts.append("<h2>Per prompt</h2>")
    rows = [
        [r["prompt"], r["kind"], *[r["metrics"].get(n) for n in names]]
        for r in metrics["per_prompt"]
    ]
    classes = [r["kind"] for r in metrics["per_prompt"]]
    parts.append(table(["prompt", "kind", *names], rows, classes))
    parts.append("<h2>Samples</h2>")
    for i, r in enumerate(metrics["per_prompt"]):
        grid = Path("grids") / f"{i:03d}.png"
        scale = write_grid([outdir / p for p in r["images"]], outdir / grid, size=size)
        scores = ", ".join(f"{n} {fmt(v)}" for n, v in r["metrics"].items())
        parts.append(
            f'<section class="prompt"><h3>{html.escape(r["prompt"])}</h3>'
            f"<p>{html.escape(r['kind'])} prompt; scored as “{html.escape(r['text'])}”; "
            f'{scores}</p><div class="row"><figure>'
            f"{img_tag(grid.as_posix(), outdir / grid, scale, r['prompt'])}"
            f"<figcaption>generated, seeds in order</figcaption></figure>"
            f"<figure>{target_html}<figcaption>training images</figcaption></figure></div>"
            "</section>"
        )
    parts.append("<h2>Configuration</h2>")
    parts.append(yaml_block("run config (.hydra/config.yaml)", run_config, open_=True))
    parts.append(yaml_block("evaluation config", eval_config))
    out = outdir / "report.html"
    out.write_text(page(f"Evaluation: {metrics['label']}", "\n".join(parts)))
    return out
