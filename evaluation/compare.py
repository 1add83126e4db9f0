"""One comparison of several evaluated runs: ``comparison.md``, ``comparison.html``,
``comparison.json`` and, per scorer with a text and an image metric, a scatter plot
``alignment_<scorer>.svg`` (image alignment across, text alignment up, one point per run).

The plot is a small SVG written here (no plotting dependency); the HTML embeds it.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from evaluation.report import fmt, page, table

PREFIX = {"concept": "", "align": "align ", "prior": "prior "}


def columns(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """Metric columns with a value for some run: concept prompts, then ``align <metric>`` and
    ``prior <metric>`` (the prompt kinds of :mod:`evaluation.prompts`)."""
    cols: dict[str, None] = {}
    for kind, prefix in PREFIX.items():
        for r in results:
            agg = r["aggregate"].get(kind, {})
            cols.update(
                {f"{prefix}{k}": None for k, v in agg.items() if k != "n_images" and v is not None}
            )
    return list(cols)


def value(result: Mapping[str, Any], column: str) -> float | None:
    kind, name = "concept", column
    for k, prefix in PREFIX.items():
        if prefix and column.startswith(prefix):
            kind, name = k, column[len(prefix) :]
    return result["aggregate"].get(kind, {}).get(name)


def rows(results: Sequence[Mapping[str, Any]], cols: Sequence[str]) -> list[list[Any]]:
    return [
        [i + 1, r["label"], r["method"], r["step"], *[value(r, c) for c in cols]]
        for i, r in enumerate(results)
    ]


def markdown(results: Sequence[Mapping[str, Any]], cols: Sequence[str]) -> str:
    head = ["#", "run", "method", "step", *cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows(results, cols):
        cells = [fmt(v).replace("|", "\\|") for v in row]
        lines.append("| " + " | ".join(html.unescape(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def scatter_svg(
    points: Sequence[tuple[float, float, str]], xlabel: str, ylabel: str, title: str
) -> str:
    """A scatter plot, points numbered 1..n with a legend of their labels below."""
    w, h, left, right, top, bottom = 560, 380, 64, 20, 36, 52
    legend_h = 16 * len(points) + 8
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]

    def span(vals: Sequence[float]) -> tuple[float, float]:
        lo, hi = min(vals), max(vals)
        pad = (hi - lo) * 0.1 or 0.05
        return lo - pad, hi + pad

    (x0, x1), (y0, y1) = span(xs), span(ys)

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (w - left - right)

    def py(y: float) -> float:
        return h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)

    e = html.escape
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + legend_h}" '
        f'viewBox="0 0 {w} {h + legend_h}" font-family="sans-serif" font-size="12">',
        f'<rect width="{w}" height="{h + legend_h}" fill="white"/>',
        f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">{e(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{w - left - right}" height="{h - top - bottom}" '
        'fill="none" stroke="#888"/>',
    ]
    for t in _ticks(x0, x1):
        out.append(
            f'<line x1="{px(t):.1f}" y1="{h - bottom}" x2="{px(t):.1f}" '
            f'y2="{h - bottom + 4}" stroke="#888"/><text x="{px(t):.1f}" '
            f'y="{h - bottom + 17}" text-anchor="middle">{t:.3g}</text>'
        )
    for t in _ticks(y0, y1):
        out.append(
            f'<line x1="{left - 4}" y1="{py(t):.1f}" x2="{left}" y2="{py(t):.1f}" '
            f'stroke="#888"/><text x="{left - 7}" y="{py(t) + 4:.1f}" '
            f'text-anchor="end">{t:.3g}</text>'
        )
    out.append(
        f'<text x="{(left + w - right) / 2}" y="{h - 14}" text-anchor="middle">{e(xlabel)}</text>'
    )
    out.append(
        f'<text transform="translate(16 {(top + h - bottom) / 2}) rotate(-90)" '
        f'text-anchor="middle">{e(ylabel)}</text>'
    )
    for i, (x, y, label) in enumerate(points, start=1):
        out.append(
            f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="5" fill="#1f77b4">'
            f"<title>{e(label)}: {x:.3f}, {y:.3f}</title></circle>"
            f'<text x="{px(x) + 7:.1f}" y="{py(y) - 6:.1f}">{i}</text>'
        )
        out.append(
            f'<text x="{left}" y="{h + 14 * i:.0f}">{i}. {e(label)} ({x:.3f}, {y:.3f})</text>'
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def plots(results: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """``{scorer: svg}`` for each scorer with a text and an image value (metrics' ``summary``)."""
    out = {}
    names = dict.fromkeys(n for r in results for n in r.get("summary", {}))
    for name in names:
        pts, xlabel, ylabel = [], "", ""
        for r in results:
            s = r["summary"].get(name, {})
            if s.get("image") is not None and s.get("text") is not None:
                pts.append((s["image"], s["text"], r["label"]))
                xlabel = f"image alignment: {s['image_metric']} (concept prompts)"
                ylabel = f"text alignment: {s['text_metric']} ({s['text_prompts']} prompts)"
        if pts:
            out[name] = scatter_svg(pts, xlabel, ylabel, f"{name}: one point per run")
    return out


def write_comparison(out: Path, results: Sequence[Mapping[str, Any]]) -> dict[str, Path]:
    """Write the table (md, html, json) and plots for ``results`` (metrics.json contents)."""
    out.mkdir(parents=True, exist_ok=True)
    cols = columns(results)
    files = {
        "md": out / "comparison.md",
        "html": out / "comparison.html",
        "json": out / "comparison.json",
    }
    files["md"].write_text(markdown(results, cols))
    summary = [
        {
            "label": r["label"],
            "run": r["run"],
            "method": r["method"],
            "step": r["step"],
            **{c: value(r, c) for c in cols},
        }
        for r in results
    ]
    files["json"].write_text(json.dumps(summary, indent=1))
    svgs = plots(results)
    for name, svg in svgs.items():
        files[f"plot_{name}"] = out / f"alignment_{name}.svg"
        files[f"plot_{name}"].write_text(svg)
    links = []
    for i, r in enumerate(results, start=1):
        rel = os.path.relpath(r["report"], out)
        links.append(f'<li>{i}. <a href="{html.escape(rel)}">{html.escape(r["label"])}</a></li>')
    first = results[0] if results else {}
    body = [
        "<h1>Comparison</h1>",
        f"<p>{len(results)} runs; prompts {fmt(first.get('prompts'))}, "
        f"{fmt(first.get('n_samples'))} images per prompt from seed {fmt(first.get('seed'))}. "
        "Metrics over the concept prompts; <em>align</em> columns over the prompts that ask for "
        "more (a second object, another colour); <em>prior</em> columns over the class word alone."
        "</p>",
        table(["#", "run", "method", "step", *cols], rows(results, cols)),
        *[f"<h2>{html.escape(n)}</h2>{svg}" for n, svg in svgs.items()],
        f"<h2>Reports</h2><ul>{''.join(links)}</ul>",
    ]
    files["html"].write_text(page("Comparison", "\n".join(body)))
    return files
