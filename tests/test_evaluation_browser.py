"""The evaluation report and comparison open in a real headless browser (Debian's Chromium,
driven by Playwright) with every image loaded and no console errors. Screenshots are kept as
artefacts in ``logs/test_artifacts/`` (look at them).

Needs ``/usr/bin/chromium`` (``apt-get install chromium``; ``.ci/run`` installs it) and the
``playwright`` package (requirements-dev.txt; its own browser download is never used). Without
them the test is skipped on a developer machine and fails under CI (``CI`` set)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT, compose_config
from tests.test_evaluation import EVAL, make_run

ARTEFACTS = ROOT / "logs" / "test_artifacts"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # this machine's closed network refuses its connections
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    missing = None
    if not Path(path).exists():
        missing = "Debian's chromium is not installed (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "the playwright package is not installed (pip install -r requirements-dev.txt)"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    return path


@pytest.fixture(scope="module")
def browser():
    executable = chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=FLAGS)
        yield b
        b.close()


def visit(browser, html: Path, screenshot: Path | None = None) -> dict:
    """Open ``html``; return console errors, page errors, failed requests and broken images."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems: dict[str, list] = {"console": [], "page": [], "requests": []}
    page.on("console", lambda m: problems["console"].append(f"{m.type}: {m.text}")
            if m.type in ("error", "warning") else None)  # fmt: skip
    page.on("pageerror", lambda e: problems["page"].append(str(e)))
    page.on("requestfailed", lambda r: problems["requests"].append(r.url))
    page.goto(html.resolve().as_uri(), wait_until="load")
    problems["broken_images"] = page.evaluate(
        "[...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)"
    )
    problems["images"] = page.evaluate("document.images.length")
    problems["svg_points"] = page.evaluate("document.querySelectorAll('svg circle').length")
    problems["title"] = page.title()
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
    page.close()
    return problems


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    sweep = tmp / "sweep"
    run = make_run(sweep / "0", tmp)
    shutil.copytree(run, sweep / "1")  # a second run for the comparison
    import evaluate

    cfg = compose_config("compare", [f"runs=[{sweep}]", *EVAL, f"out={tmp / 'cmp'}"], tmp / "j")
    files = evaluate.compare(cfg)
    return run / "eval" / "toy" / "report.html", files["html"]


def test_report_in_chromium(browser, outputs):
    report, _ = outputs
    shot = ARTEFACTS / "evaluation_report.png"
    seen = visit(browser, report, shot)
    assert seen["title"].startswith("Evaluation:")
    assert seen["images"] == 2 * 10  # a grid and the training images per prompt
    assert not seen["broken_images"] and not seen["console"] and not seen["page"]
    assert not seen["requests"]
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


def test_comparison_in_chromium(browser, outputs):
    _, comparison = outputs
    shot = ARTEFACTS / "evaluation_comparison.png"
    seen = visit(browser, comparison, shot)
    assert seen["svg_points"] == 2  # one point per run
    assert not seen["broken_images"] and not seen["console"] and not seen["page"]
    assert not seen["requests"]
    print(f"screenshot: {shot}")


def test_browser_check_catches_a_missing_image(browser, outputs, tmp_path):
    report, _ = outputs
    copy = tmp_path / "eval"
    shutil.copytree(report.parent, copy)
    (copy / "grids" / "000.png").unlink()
    seen = visit(browser, copy / "report.html")
    assert [Path(s).name for s in seen["broken_images"]] == ["000.png"]
    assert seen["requests"]  # the failed load is reported too
