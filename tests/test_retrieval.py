"""Retrieval of real regularization images, end to end and offline.

A random-weight open_clip ViT-B-32 (saved in tmp) indexes DreamBooth images; a real
``clip-retrieval back`` process serves the index on 127.0.0.1; the project's retrieval command
queries it and downloads from a loopback HTTP server that also serves broken cases.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from PIL import Image

from data.download import fetch_image
from data.retrieve import ClipRetrievalClient, KnnClient
from data.retrieve import main as retrieve_main
from tests.conftest import ROOT, compose_config

log = logging.getLogger(__name__)
DREAMBOOTH = ROOT / "tests" / "data" / "dreambooth"  # one photo per subject
EXTRA = ("clip_retrieval", "open_clip", "faiss", "pandas")
needs_extra = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in EXTRA),
    reason="needs the retrieval extra: pip install -r requirements-retrieval.txt",
)
# clip-anytorch (pulled by clip-retrieval) imports pkg_resources, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:pkg_resources is deprecated:UserWarning")
ENV = {"HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
TIMEOUT = 1.0  # per image request in these tests; the slow route sleeps 3 s
BROKEN = {  # route -> the reason the retrieval must give
    "missing.jpg": "HTTP 404",
    "truncated.jpg": "unreadable image",
    "page.html": "not an image",
    "huge.jpg": "too large",
    "slow.jpg": "timed out",
    "tiny.png": "too small",
    "copy.jpg": "same bytes",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_hosts(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) with a socket listening on ``port``."""
    hosts = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:] if Path(table).exists() else []:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                hosts.add(local.rsplit(":", 1)[0])
    return hosts


def png_bytes(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


class ImageServer(ThreadingHTTPServer):
    """Loopback server of the candidate URLs; counts requests per route."""

    daemon_threads = True

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.files, self.hits, self.lock = files, {}, threading.Lock()

    def url(self, route: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{route}"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def send(self, status: int, body: bytes, kind: str = "image/jpeg", length=True) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        route = self.path.lstrip("/")
        with self.server.lock:
            hits = self.server.hits[route] = self.server.hits.get(route, 0) + 1
        jpeg = self.server.files["img/cat.jpg"]
        try:
            if route in self.server.files:
                self.send(200, self.server.files[route])
            elif route == "truncated.jpg":
                self.send(200, jpeg[: len(jpeg) // 3])
            elif route == "page.html":
                self.send(200, b"<html><body>Moved</body></html>", "text/html; charset=utf-8")
            elif route == "huge.jpg":  # decodable (trailing bytes), 30 MB, no Content-Length
                self.send(200, jpeg + bytes(30 * 2**20), length=False)
            elif route == "slow.jpg":
                time.sleep(3 * TIMEOUT)
                self.send(200, jpeg)
            elif route == "tiny.png":
                self.send(200, png_bytes(8), "image/png")
            elif route == "copy.jpg":
                self.send(200, jpeg)
            elif route == "flaky.jpg":  # 503 once, then an image: retried within the run
                busy = hits == 1
                self.send(503, b"busy", "text/plain") if busy else self.send(200, png_bytes(96))
            else:
                self.send(404, b"not found", "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (size cap, timeout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(image server, backend URL, expected {url: caption}, the image folder) for the module."""
    import open_clip
    import torch

    from data.retrieval_index import main as index_main

    start = time.monotonic()
    tmp = tmp_path_factory.mktemp("retrieval")
    subjects = sorted(DREAMBOOTH.glob("*.jpg"))
    assert len(subjects) >= 18, "the DreamBooth images are needed"
    files = {f"img/{s.name}": s.read_bytes() for s in subjects}
    server = ImageServer(files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    backend, backend_log = None, (tmp / "backend.log").open("w")  # noqa: SIM115 - closed below

    # The index: one image per subject; 11 rows point at good URLs, 7 at broken ones.
    folder = tmp / "collection"
    folder.mkdir()
    routes = [*list(files)[:10], "flaky.jpg", *BROKEN]
    captions = {}
    for i, (subject, route) in enumerate(zip(subjects, routes, strict=False)):
        captions[server.url(route)] = f"a photo of a {subject.stem.replace('_', ' ')}, {i}"
        (folder / f"{i:03d}.jpg").write_bytes(subject.read_bytes())
        meta = {"url": server.url(route), "caption": captions[server.url(route)]}
        (folder / f"{i:03d}.json").write_text(json.dumps(meta))
    torch.manual_seed(0)
    ckpt = tmp / "vit_b_32_random.pt"
    try:
        weights = open_clip.create_model("ViT-B-32", pretrained=None).state_dict()
        torch.save({k: v.half() for k, v in weights.items()}, ckpt)  # half the bytes to load
        log.info("random CLIP saved: %.1f s", time.monotonic() - start)
        index = tmp / "index"
        assert index_main(["build", str(folder), str(index), "--pretrained", str(ckpt)]) == 0
        log.info("index built: %.1f s", time.monotonic() - start)
        port = free_port()
        serve = ["-m", "data.retrieval_index", "serve", str(index), "--port", str(port)]
        backend = subprocess.Popen([sys.executable, *serve], cwd=ROOT, env={**os.environ, **ENV},
                                   stdout=backend_log, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 180
        while True:
            assert backend.poll() is None, (tmp / "backend.log").read_text()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/indices-list", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "backend not ready in 180 s"
            time.sleep(0.5)
        log.info("backend ready: %.1f s", time.monotonic() - start)
        yield server, f"http://127.0.0.1:{port}/knn-service", captions, folder
    finally:
        if backend is not None:
            backend.terminate()
            backend.wait(30)
        backend_log.close()
        server.shutdown()
        server.server_close()


def run_retrieve(out: Path, url: str, *extra: str) -> int:
    return retrieve_main([
        "--class_prompt", "dog", "--num", "30", "--outpath", str(out), "--backend_url", url,
        "--timeout", str(TIMEOUT), "--retries", "1", "--max_bytes", str(10 * 2**20),
        "--workers", "4", "--no_deduplicate", "--quiet", *extra,
    ])  # fmt: skip


@needs_extra
def test_retrieve_keeps_exactly_the_valid_images(setup, tmp_path):
    server, url, captions, _ = setup
    if Path("/proc/net/tcp").exists():  # `serve` binds loopback, not clip_back's 0.0.0.0
        assert listening_hosts(int(url.split(":")[2].split("/")[0])) == {"0100007F"}
    # ClipClient's query gets the same answer as ours from the real backend.
    assert KnnClient(url).query("dog", 40) == ClipRetrievalClient(url).query("dog", 40)
    # Random weights make unrelated photos look alike to the backend's de-duplication: off.
    ranked = [r["url"] for r in KnnClient(url, deduplicate=False).query("dog", 40)]
    assert sorted(ranked) == sorted(captions)
    good = [u for u in ranked if "/img/" in u or u.endswith("flaky.jpg")]
    copy, original = server.url("copy.jpg"), server.url("img/cat.jpg")
    if ranked.index(copy) < ranked.index(original):  # the first of two equal files is kept
        good[good.index(original)] = copy
    expected = {u: captions[u] for u in good}
    out = tmp_path / "samples_dog"
    cmd = [sys.executable, "-m", "data.retrieve", "--class_prompt", "dog", "--num", "30",
           "--outpath", str(out), "--backend_url", url, "--timeout", str(TIMEOUT),
           "--retries", "1", "--max_bytes", str(10 * 2**20), "--workers", "4",
           "--no_deduplicate"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "only 11 of 30" in proc.stderr

    urls = (out / "urls.txt").read_text().splitlines()
    listed = (out / "caption.txt").read_text().splitlines()
    paths = [Path(p) for p in (out / "images.txt").read_text().splitlines()]
    assert sorted(urls) == sorted(expected)
    assert dict(zip(urls, listed, strict=True)) == expected
    assert sorted(paths) == sorted((out / "images").iterdir())
    served = {server.url(k): v for k, v in server.files.items()}
    served[copy] = server.files["img/cat.jpg"]
    for path, u in zip(paths, urls, strict=True):
        assert path.read_bytes() == served.get(u, png_bytes(96))
    rejected = json.loads((out / "retrieval.json").read_text())["rejected"]
    assert sorted(rejected) == sorted(set(captions) - set(expected))
    for u, why in rejected.items():
        assert BROKEN.get(u.rsplit("/", 1)[1], "same bytes") in why["reason"]
        assert why["transient"] == u.endswith("slow.jpg")
    assert server.hits["slow.jpg"] == 2 and server.hits["flaky.jpg"] == 2  # retried once

    # A second run downloads nothing; a lost image is fetched again, alone.
    hits = dict(server.hits)
    stamps = [p.stat().st_mtime_ns for p in paths]
    assert run_retrieve(out, url) == 0
    assert server.hits == hits
    assert [p.stat().st_mtime_ns for p in paths] == stamps
    paths[0].unlink()
    assert run_retrieve(out, url) == 0
    changed = {k: v - hits.get(k, 0) for k, v in server.hits.items() if v != hits.get(k, 0)}
    assert changed == {urls[0].split("/", 3)[3]: 1}
    assert sorted((out / "urls.txt").read_text().splitlines()) == sorted(expected)
    # --retry_failed fetches every refused URL again, and still keeps none of them.
    hits = dict(server.hits)
    assert run_retrieve(out, url, "--retry_failed") == 0
    assert all(server.hits[u.split("/", 3)[3]] > hits[u.split("/", 3)[3]] for u in rejected)
    assert sorted((out / "urls.txt").read_text().splitlines()) == sorted(expected)


@needs_extra
def test_finetune_real_prepare_retrieves_once(setup, tmp_path):
    from hydra.utils import instantiate

    from main import run_prepare

    server, url, all_captions, _ = setup
    options = {"class_prompt": "dog", "n": 6, "backend_url": url, "deduplicate": "false",
               "timeout": TIMEOUT, "retries": 0}  # fmt: skip
    overrides = ["model=tiny", "class_images=retrieve", f"paths.cache_dir={tmp_path}",
                 *(f"prepare.class_images.{k}={v}" for k, v in options.items())]  # fmt: skip
    cfg = compose_config("finetune_real", overrides, tmp_path / "run")
    run_prepare(cfg)
    hits = sum(server.hits.values())
    run_prepare(compose_config("finetune_real", overrides, tmp_path / "run2"))
    assert sum(server.hits.values()) == hits  # cached: nothing fetched again
    class_dir = tmp_path / "run2" / "class_images"
    captions = (class_dir / "caption.txt").read_text().splitlines()
    assert len(captions) == 6 and set(captions) <= set(all_captions.values())

    # The datamodule mixes them 1:1 with the targets, each with its own caption.
    data = instantiate(cfg.data).train_set
    assert len(data) == 12
    regs = [data[i]["caption"] for i in range(6)]
    assert sorted(regs) == sorted(captions) and all(data.is_regularization(i) for i in range(6))
    assert all("<new1>" in data[i]["caption"] for i in range(6, 12))


def test_unreachable_backend_names_the_alternatives(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/knn-service"
    assert run_retrieve(tmp_path / "out", url) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unreachable" in err and url in err
    for alternative in ("retrieval_index", "finetune_gen", "folder"):
        assert alternative in err


def test_fetch_local_files(tmp_path):
    good, tiny, text = tmp_path / "good.png", tmp_path / "tiny.png", tmp_path / "notes.jpg"
    good.write_bytes(png_bytes(80))
    tiny.write_bytes(png_bytes(8))
    text.write_text("hello")
    assert fetch_image(good.as_uri()).ok and fetch_image(str(good)).ext == ".png"
    assert "too small" in fetch_image(str(tiny)).reason
    assert fetch_image(str(text)).reason == "not an image"
    assert "too large" in fetch_image(str(good), max_bytes=10).reason
    assert "no such file" in fetch_image(str(tmp_path / "gone.jpg")).reason


@needs_extra
@pytest.mark.slow
def test_index_matches_clip_retrieval_inference(setup, tmp_path):
    """Our embeddings equal `clip-retrieval inference`'s on the same images and model."""
    import tarfile

    import faiss
    import numpy as np

    _, _, _, folder = setup
    index = folder.parent / "index"
    info = json.loads((index / "index_info.json").read_text())
    images = sorted(folder.glob("*.jpg"))
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        for p in images:  # webdataset input: the files input hangs with captions (#352)
            tar.add(p, arcname=p.name)
    cmd = ["clip-retrieval", "inference", "--input_dataset", str(shard), "--input_format",
           "webdataset", "--output_folder", str(tmp_path / "emb"), "--clip_model",
           info["clip_model"], "--use_jit", "False", "--enable_text", "False",
           "--num_prepro_workers", "1", "--batch_size", "8", "--enable_wandb", "False",
           "--wds_number_file_per_input_file", str(len(images))]  # fmt: skip
    env = {**os.environ, **ENV}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = np.load(tmp_path / "emb" / "img_emb" / "img_emb_0.npy")
    ours = faiss.read_index(str(index / "image.index")).reconstruct_n(0, len(images))
    assert theirs.shape == ours.shape
    assert np.abs(theirs - ours).max() < 1e-4
