"""The web app end to end in a real headless browser (Debian's Chromium driven by Playwright, on
loopback): start ``python -m app``, train Custom Diffusion on the toy base for a few steps on a
bundled concept, sample with the delta and Attend-and-Excite, read the image back, download the
delta in another format, and check that bad input gives a visible message while the app keeps
running; then cancel a longer training and check its saved deltas, and compare the two runs on
the Compare page. Screenshots are kept in ``logs/test_artifacts/app_*.png`` (look at them).

Chromium and playwright as in test_evaluation_browser.py (skipped on a developer machine without
them, a failure under CI)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT
from tests.test_evaluation_browser import ARTEFACTS, FLAGS, chromium

TRAIN_STEPS = 4
# ~2-3 min: three training/evaluation processes on the CPU; CI runs it (`-m "not slow or ci"`)
pytestmark = [pytest.mark.slow, pytest.mark.ci]


def start_app(logs: Path, log_file: Path) -> tuple[subprocess.Popen, str]:
    """``python -m app --port 0``; returns the process and its URL (read from its output)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = log_file.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "--port", "0", "--logs", str(logs), "--threads", "1"],
        cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited: {log_file.read_text()[-2000:]}")
        found = re.search(r"serving on (http://127\.0\.0\.1:\d+/)", log_file.read_text())
        if found:
            return proc, found[1]
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the app did not start within 90 s")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    chromium()  # skip (or fail under CI) before starting anything
    tmp = tmp_path_factory.mktemp("app")
    proc, url = start_app(tmp / "logs", tmp / "app.log")
    yield url, tmp / "logs"
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    assert proc.returncode is not None


@pytest.fixture(scope="module")
def page(app_url):
    from playwright.sync_api import sync_playwright

    url, _ = app_url
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=FLAGS)
        viewport = {"width": 1280, "height": 900}
        context = browser.new_context(viewport=viewport, accept_downloads=True)
        pg = context.new_page()
        pg.problems = []  # console errors and page errors over the whole session
        pg.on("pageerror", lambda e: pg.problems.append(f"page: {e}"))
        pg.on("console", lambda m: pg.problems.append(f"console: {m.text}")
              if m.type == "error" and "400 (Bad Request)" not in m.text else None)  # fmt: skip
        pg.goto(url)
        pg.wait_for_selector("#method-select option", state="attached")
        yield pg
        browser.close()


def shot(page, name: str) -> Path:
    path = ARTEFACTS / f"app_{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    return path


def visible_text(page, selector: str, timeout: float = 60_000) -> str:
    page.wait_for_selector(f"{selector}:not(.hidden)", timeout=timeout)
    return page.inner_text(selector)


def image_bytes(page, url: str) -> bytes:
    """Fetch ``url`` from inside the page (as the browser sees it)."""
    data = page.evaluate(
        "async (u) => Array.from(new Uint8Array(await (await fetch(u)).arrayBuffer()))", url
    )
    return bytes(data)


def png(tmp: Path, name: str, size: int = 40) -> Path:
    path = tmp / name
    Image.new("RGB", (size, size), (200, 40, 90)).save(path)
    return path


def test_app_end_to_end(page, app_url, tmp_path):
    t0 = time.time()
    url, logs = app_url
    banner = page.inner_text("#base-banner")
    assert "toy" in banner.lower() and "Stable Diffusion" in banner
    methods = page.eval_on_selector_all("#method-select option", "os => os.map(o => o.value)")
    assert "finetune_noreg" in methods

    # --- Train: bad input first (visible messages), then a few steps on a bundled concept.
    page.check("input[name=source][value=images]")
    note = tmp_path / "notes.txt"
    note.write_text("not an image")
    page.set_input_files("#image-files", [png(tmp_path, "a.png"), note, png(tmp_path, "c.png")])
    page.fill("#class-word", "triangle")
    page.click("#start-train")
    assert "notes.txt (not an image)" in visible_text(page, "#train-error")
    page.set_input_files("#image-files", [png(tmp_path, "a.png"), png(tmp_path, "c.png")])
    page.click("#start-train")
    assert "you gave 2" in visible_text(page, "#train-error")
    shot(page, "train_error")

    page.check("input[name=source][value=concept]")
    page.select_option("#concept-select", "dotted_triangle")
    page.select_option("#method-select", "finetune_noreg")
    assert page.input_value("#class-word") == "triangle"
    page.fill("#steps", str(TRAIN_STEPS))
    page.fill("#preview-every", "2")
    page.click("#start-train")
    page.wait_for_function("document.querySelector('#train-progress').value >= 1", timeout=120_000)
    assert re.search(r"step \d+ / 4", page.inner_text("#train-numbers"))
    shot(page, "train_running")
    page.wait_for_function(
        "/^(Finished|Failed)/.test(document.querySelector('#train-status').textContent)",
        timeout=180_000,
    )
    status = page.inner_text("#train-status")
    assert status.startswith("Finished"), page.inner_text("#train-log")
    assert page.eval_on_selector("#train-progress", "p => p.value") == TRAIN_STEPS
    assert "loss" in page.inner_text("#train-numbers")
    samples = page.eval_on_selector_all(
        "#train-samples img", "is => is.map(i => [i.complete && i.naturalWidth > 0, i.alt])"
    )
    assert len(samples) >= 2 and all(ok for ok, _ in samples)  # logged at step 2, 4 and the end
    assert "last.safetensors" in page.inner_text("#train-deltas")
    assert page.locator("#loss-chart polyline").count() == 2
    shot(page, "train")
    t_train = time.time() - t0

    # --- Sample: the new delta, bad prompts, then A&E on the concept's token.
    page.click("#use-delta")
    page.wait_for_selector("#token-plan:not(.hidden)")
    assert "<new1>" in page.inner_text("#token-plan")
    assert page.input_value("#prompt") == "a photo of a <new1> triangle"
    page.fill("#sample-steps", "10")
    page.fill("#n-images", "1")
    page.fill("#prompt", "a photo of a <new2> triangle")
    page.click("#generate")
    assert "unknown token <new2>" in visible_text(page, "#sample-error")
    page.fill("#prompt", " ".join(["a red circle and"] * 20) + " a square")
    page.click("#generate")
    assert "tokens long" in visible_text(page, "#sample-error")
    page.fill("#prompt", "a photo of a <new1> triangle")
    page.check("#ae-enabled")
    assert page.input_value("#ae-words") == "<new1>"
    page.fill("#ae-words", "<new1>, triangle")
    page.click("#generate")
    page.wait_for_function(
        "/^Done/.test(document.querySelector('#sample-status').textContent) || "
        "!document.querySelector('#sample-error').classList.contains('hidden')",
        timeout=120_000,
    )
    assert page.is_hidden("#sample-error"), page.inner_text("#sample-error")
    src = page.get_attribute("#result-images img", "src")
    image = Image.open(io.BytesIO(image_bytes(page, src)))
    assert image.size == (32, 32)
    assert np.asarray(image.convert("L"), dtype=float).std() > 1.0  # not a blank image
    maps = page.eval_on_selector_all("#maps img", "is => is.map(i => i.naturalWidth)")
    assert len(maps) == 1 and maps[0] > 100  # the attention-map figure, with two word columns
    assert "Attend-and-Excite on" in page.inner_text("#result-help")
    shot(page, "sample")

    # The delta in the reference's CompVis format, downloaded through the page.
    with page.expect_download() as dl:
        page.click("#delta-downloads a[data-format=compvis]")
    saved = tmp_path / dl.value.suggested_filename
    dl.value.save_as(saved)
    from custom import formats

    delta = formats.read(saved, "compvis")
    assert delta.tokens == ["<new1>"] and any(".attn2.to_k." in k for k in delta.tensors)

    # A delta made for another base: uploaded, then refused with a message.
    from ldm.checkpoint import load_state_dict, read_metadata, save_state_dict

    last = next((logs / "app_runs").glob("*/checkpoints/last.safetensors"))
    meta = {**read_metadata(last), "base_hash": "0123456789abcdef"}
    other = tmp_path / "other_base.safetensors"
    save_state_dict(load_state_dict(last), other, metadata=meta)
    page.uncheck("#ae-enabled")
    page.set_input_files("#delta-upload", str(other))
    page.wait_for_function(
        "[...document.querySelectorAll('#delta-list input:checked')].length === 1 && "
        "document.querySelector('#delta-list input:checked').dataset.path.endsWith("
        "'other_base.safetensors')"
    )
    page.click("#generate")
    assert "does not fit this base model" in visible_text(page, "#sample-error")
    shot(page, "sample_error")

    # The app kept running through all of it.
    page.reload()
    page.wait_for_selector("#method-select option", state="attached")
    assert not page.problems, page.problems
    print(f"\ntrain {t_train:.0f} s, total {time.time() - t0:.0f} s; screenshots in {ARTEFACTS}")


def test_cancel_keeps_saved_deltas(page, app_url):
    from ldm.checkpoint import read_metadata

    t0 = time.time()
    _, logs = app_url
    page.click("#tab-train")
    page.select_option("#method-select", "finetune_noreg")
    page.select_option("#concept-select", "striped_circle")
    assert page.input_value("#class-word") == "circle"
    page.fill("#steps", "300")
    page.fill("#preview-every", "2")
    page.click("#start-train")
    page.wait_for_function(
        "document.querySelector('#train-status').textContent.includes('striped_circle') && "
        "document.querySelector('#train-progress').value >= 3",
        timeout=120_000,
    )
    page.click("#cancel-train")
    page.wait_for_function(
        "/^(Cancelled|Failed)/.test(document.querySelector('#train-status').textContent)",
        timeout=120_000,
    )
    assert page.inner_text("#train-status").startswith("Cancelled"), page.inner_text("#train-log")
    saved = page.inner_text("#train-deltas")
    assert "step_000002.safetensors" in saved and "last.safetensors" in saved
    run = max((logs / "app_runs").glob("*"), key=lambda p: p.stat().st_mtime)
    step = int(read_metadata(run / "checkpoints" / "last.safetensors")["step"])
    assert 3 <= step < 300  # the delta of the step reached, saved as training ended early
    assert page.is_visible("#use-delta")
    shot(page, "train_cancelled")
    print(f"\ncancelled at step {step} after {time.time() - t0:.0f} s")


def test_compare_page(page):
    t0 = time.time()
    page.click("#tab-compare")
    page.wait_for_selector("#run-list input", state="attached")
    boxes = page.locator("#run-list input")
    assert boxes.count() == 2  # the two runs trained above
    boxes.nth(0).check()
    boxes.nth(1).check()
    page.fill("#eval-n", "1")
    page.fill("#eval-steps", "5")
    page.click("#evaluate")
    page.wait_for_function(
        "/^(Finished|Failed)/.test(document.querySelector('#compare-status').textContent)",
        timeout=300_000,
    )
    status = page.inner_text("#compare-status")
    assert status.startswith("Finished"), page.inner_text("#compare-log")
    frame = page.frame_locator("#compare-frame")
    frame.locator("table").first.wait_for()
    assert frame.locator("svg circle").count() == 2  # one point per run in the alignment plot
    # each run now links its own report
    page.wait_for_function("document.querySelector('#run-list').textContent.includes('report')")
    shot(page, "compare")
    assert not page.problems, page.problems
    print(f"\ncompare {time.time() - t0:.0f} s")
