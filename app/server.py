"""The app's HTTP server (standard library only): a JSON API under ``/api/``, the page under
``/``, and files of the logs folder (images, reports, deltas) under ``/files/``.

Every handler turns bad input into ``400 {"error": message}``, which the page shows; any other
exception is logged and returned as ``500`` with one line, and the server keeps running.
"""

from __future__ import annotations

import io
import json
import logging
import mimetypes
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from app import deltas as dl
from app import jobs, uploads
from app.methods import (
    InputError,
    TrainRequest,
    check_class_word,
    check_numbers,
    command,
    sample_prompts,
)
from app.sampling import Base, SampleService

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
MAX_BODY = 500 * 1024 * 1024


class App:
    """State shared by the request handlers."""

    def __init__(self, base: Base, logs: Path, methods: list, sd_note: str) -> None:
        self.base = base
        self.logs = logs.resolve()
        self.methods = {m.recipe: m for m in methods}
        self.sd_note = sd_note
        self.jobs = jobs.JobRunner()
        self.sampler = SampleService(base, self.logs)
        self._tokenizer = None

    # ------------------------------------------------------------- helpers
    def inside(self, path: str | Path) -> Path:
        """``path`` (absolute, or relative to the logs folder) if it is inside it."""
        p = Path(path)
        p = (p if p.is_absolute() else self.logs / p).resolve()
        if not p.is_relative_to(self.logs):
            raise InputError(f"{path}: not inside the app's logs folder")
        if not p.exists():
            raise InputError(f"{path}: no such file")
        return p

    def url(self, path: str | Path | None) -> str | None:
        if path is None:
            return None
        p = Path(path).resolve()
        rel = p.relative_to(self.logs).as_posix()
        stamp = int(p.stat().st_mtime) if p.exists() else 0
        return f"/files/{rel}?v={stamp}"

    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import CLIPTokenizer

            from ldm.modules.encoders.clip import TOKENIZER_DIR

            self._tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
        return self._tokenizer

    # ------------------------------------------------------------- pages
    def info(self) -> dict[str, Any]:
        from toyworld.concepts import CONCEPTS

        return {
            "base": {
                "name": self.base.name,
                "description": self.base.describe(),
                "is_toy": self.base.is_toy,
                "note": self.sd_note,
            },  # fmt: skip
            "methods": [m.public() for m in self.methods.values()],
            "concepts": [
                {"name": c.name, "class_word": c.class_word, "description": c.description}
                for c in CONCEPTS.values()
            ],
            "logs": str(self.logs),
            "limits": {"min_images": uploads.MIN_IMAGES, "max_images": uploads.MAX_IMAGES},
        }

    def concept_preview(self, name: str) -> bytes:
        from PIL import Image

        from toyworld.concepts import CONCEPTS, concept_images

        if name not in CONCEPTS:
            raise InputError(f"unknown concept {name!r}")
        images = concept_images(name, 6)
        strip = Image.new("RGB", (6 * 66, 64), "white")
        for i, im in enumerate(images):
            strip.paste(im.resize((64, 64), Image.NEAREST), (i * 66, 0))
        buf = io.BytesIO()
        strip.save(buf, format="PNG")
        return buf.getvalue()

    def train(self, body: dict[str, Any]) -> dict[str, Any]:
        method = self.methods.get(str(body.get("method")))
        if method is None:
            raise InputError(f"Choose a method (one of: {', '.join(self.methods)}).")
        word = check_class_word(body.get("class_word"), method, self.base.name, self.tokenizer())
        steps, lr, preview = check_numbers(body.get("steps"), body.get("lr"), body.get("preview"))
        concept = body.get("concept") or None
        files = body.get("images") or []
        if concept and files:
            raise InputError("Choose a bundled concept or upload images, not both.")
        if not concept and not files:
            raise InputError("Choose a bundled concept, or upload 3 to 20 images of yours.")
        if concept:
            from toyworld.concepts import CONCEPTS

            if concept not in CONCEPTS:
                raise InputError(f"Unknown bundled concept {concept!r}.")
        images = uploads.read_images(files) if files else None
        if (busy := self.jobs.busy()) is not None:
            raise InputError(f"A {busy.kind} job is running ({busy.dir.name}): wait or cancel it.")
        run = self.logs / "app_runs" / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{method.recipe}"
        images_dir = None
        if images is not None:
            images_dir = uploads.write_images(images, f"a photo of a {word}", run / "upload")
        req = TrainRequest(method, self.base.name, word, steps, lr, run, concept, images_dir,
                           preview, self.base.ckpt)  # fmt: skip
        argv = command(req)
        info = {"method": method.recipe, "label": method.label, "class_word": word,
                "concept": concept, "steps": steps, "lr": lr, "token": method.token,
                "prompt": method.prompt.format(token=method.token, class_word=word),
                "sample_prompts": sample_prompts(method, word)}  # fmt: skip
        try:
            self.jobs.start("train", run, argv, info)
        except RuntimeError as exc:
            raise InputError(str(exc)) from None
        return self.job_status()

    def job_status(self) -> dict[str, Any]:
        self.jobs.poll()
        job = self.jobs.job
        if job is None:
            return {"status": "none"}
        lines = jobs.tail(job.log_file)
        out: dict[str, Any] = {
            "kind": job.kind,
            "status": job.status(),
            "run": str(job.dir),
            "run_name": job.dir.name,
            "info": job.info,
            "elapsed": round((job.ended or time.time()) - job.started, 1),
            "log": lines,
        }
        if job.status() == "failed":
            out["error"] = jobs.error_line(lines)
        if job.kind == "train":
            prog = jobs.read_progress(job.dir / "progress.jsonl")
            steps, losses = prog["steps"], prog["losses"]
            stride = max(1, len(steps) // 300)
            out.update(
                step=steps[-1] if steps else 0,
                max_steps=prog["max_steps"] or job.info.get("steps"),
                loss=losses[-1] if losses else None,
                curve=[[s, lo] for s, lo in zip(steps[::stride], losses[::stride], strict=True)],
                seconds_per_step=jobs.seconds_per_step(prog),
                phase=jobs.phase(job, prog),
                samples=[
                    {"url": self.url(p), "name": p.stem}
                    for p in jobs.images_in(job.dir / "samples")
                ],  # fmt: skip
                checkpoints=[
                    {"url": self.url(p), "name": p.name, "path": str(p)}
                    for p in jobs.deltas_in(job.dir / "checkpoints")
                ],  # fmt: skip
            )
        else:
            result = job.dir / "app_result.json"
            if result.exists():
                data = json.loads(result.read_text())
                out["reports"] = [self.url(p) for p in data["reports"] if Path(p).exists()]
                out["comparison"] = self.url(data["comparison"]) if data["comparison"] else None
        return out

    def plan(self, body: dict[str, Any]) -> dict[str, Any]:
        infos = [dl.describe(self.inside(p)) for p in body.get("deltas") or []]
        dl.check_selection(infos)
        names = dl.rename_plan(infos)
        return {
            "deltas": [
                {**d.public(self.logs), "tokens_in_prompt": n, "renamed": n != d.tokens}
                for d, n in zip(infos, names, strict=True)
            ],
            "merge": len(infos) > 1,
            "vico": bool(infos and infos[0].is_vico),
        }

    def sample(self, body: dict[str, Any]) -> dict[str, Any]:
        infos = [dl.describe(self.inside(p)) for p in body.get("deltas") or []]
        dl.check_selection(infos)
        req = dict(body)
        if body.get("reference_image"):
            try:
                name, image = uploads.read_image(body["reference_image"])
            except InputError as exc:
                raise InputError(f"Reference image: {exc}. Upload a PNG or JPEG.") from None
            folder = self.logs / "app_uploads" / "reference"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{int(time.time())}_{Path(name).stem}.png"
            image.save(path)
            req["reference"] = str(path)
        self.sampler.start(req, infos)
        return self.sample_status()

    def sample_status(self) -> dict[str, Any]:
        state = self.sampler.state.public()
        res = state.get("result")
        if res:
            state["result"] = {
                **res,
                "images": [self.url(p) for p in res["images"]],
                "grid": self.url(res["grid"]),
                "maps": [self.url(p) for p in res["maps"]],
                "delta_path": res["delta"],
                "delta": self.url(res["delta"]) if res["delta"] else None,
            }
        return state

    def export(self, query: dict[str, list[str]]) -> Path:
        path = self.inside(query.get("delta", [""])[0])
        fmt = query.get("format", ["safetensors"])[0]
        ckpt = str(self.base.ckpt) if self.base.ckpt else None
        return dl.export(path, fmt, self.logs / "app_exports", self.base.config, ckpt)

    def runs(self) -> list[dict[str, Any]]:
        from evaluation.runs import find_runs, load_run

        try:
            found = find_runs(self.logs)
        except FileNotFoundError:
            return []
        out = []
        for run in found:
            try:
                info = load_run(run)
            except (OSError, ValueError) as exc:
                log.debug("skipping run %s: %s", run, exc)
                continue
            if info.weights is None:
                continue
            reports = sorted(run.glob("eval/*/report.html"))
            out.append({
                "path": str(run), "rel": run.relative_to(self.logs).as_posix(),
                "label": info.label, "method": info.method, "step": info.step,
                "toy_concept": info.toy_concept, "mtime": info.weights.stat().st_mtime,
                "reports": [{"name": p.parent.name, "url": self.url(p)} for p in reports],
            })  # fmt: skip
        return sorted(out, key=lambda r: r["mtime"], reverse=True)

    def compare(self, body: dict[str, Any]) -> dict[str, Any]:
        runs = [self.inside(p) for p in body.get("runs") or []]
        if not runs:
            raise InputError("Tick at least one run to evaluate.")
        try:
            n, steps = int(body.get("n_samples", 4)), int(body.get("steps", 25))
        except (TypeError, ValueError):
            raise InputError("Images per prompt and steps must be whole numbers.") from None
        if not (1 <= n <= 16 and 1 <= steps <= 200):
            raise InputError("Images per prompt: 1 to 16; steps: 1 to 200.")
        out = self.logs / "app_compare" / time.strftime("%Y-%m-%d_%H-%M-%S")
        argv = ["-m", "app.evaluate_runs", "--out", str(out), "--n-samples", str(n),
                "--steps", str(steps), *map(str, runs)]  # fmt: skip
        try:
            self.jobs.start("evaluate", out, argv, {"runs": [r.name for r in runs]})
        except RuntimeError as exc:
            raise InputError(str(exc)) from None
        return self.job_status()


class Handler(BaseHTTPRequestHandler):
    app: App  # set by make_server
    server_version = "ldm-personalize-app"

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _file(self, path: Path, download: bool = False) -> None:
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        extra = {"Content-Disposition": f'attachment; filename="{path.name}"'} if download else {}
        self._send(200, path.read_bytes(), ctype, extra)

    def _body(self) -> dict[str, Any]:
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_BODY:
            raise InputError(f"Upload too large: {n / 1e6:.0f} MB, at most {MAX_BODY // 2**20} MB.")
        try:
            data = json.loads(self.rfile.read(n) or b"{}")
        except json.JSONDecodeError:
            raise InputError("The request is not valid JSON.") from None
        if not isinstance(data, dict):
            raise InputError("The request must be a JSON object.")
        return data

    def _guard(self, fn) -> None:
        try:
            fn()
        except InputError as exc:
            self._json({"error": str(exc)}, HTTPStatus.BAD_REQUEST)
        except Exception as exc:  # the app keeps running; the page shows the line
            log.exception("request %s failed", self.path)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self._json({"error": f"{type(exc).__name__}: {first}"}, 500)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self._guard(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._guard(self._post)

    def _get(self) -> None:
        url = urlparse(self.path)
        path, app = unquote(url.path), self.app
        if path in ("/", "/index.html"):
            return self._file(STATIC / "index.html")
        if path.startswith("/static/"):
            f = (STATIC / path[len("/static/") :]).resolve()
            if not f.is_relative_to(STATIC) or not f.is_file():
                return self._json({"error": "not found"}, 404)
            return self._file(f)
        if path.startswith("/files/"):
            try:
                return self._file(app.inside(path[len("/files/") :]))
            except InputError:
                return self._json({"error": f"not found: {path}"}, 404)
        if path.startswith("/api/concept/") and path.endswith(".png"):
            name = path[len("/api/concept/") : -4]
            return self._send(200, app.concept_preview(name), "image/png")
        if path == "/api/export":
            return self._file(app.export(parse_qs(url.query)), download=True)
        routes = {
            "/api/info": app.info,
            "/api/train/status": app.job_status,
            "/api/compare/status": app.job_status,
            "/api/sample/status": app.sample_status,
            "/api/deltas": lambda: [d.public(app.logs) for d in dl.find_deltas(app.logs)],
            "/api/runs": app.runs,
        }
        if path not in routes:
            return self._json({"error": f"not found: {path}"}, 404)
        return self._json(routes[path]())

    def _post(self) -> None:
        path, app = urlparse(self.path).path, self.app
        if path == "/api/train/cancel":
            job = app.jobs.cancel()
            return self._json(app.job_status() if job else {"status": "none"})
        body = self._body()
        routes = {
            "/api/train": app.train,
            "/api/plan": app.plan,
            "/api/sample": app.sample,
            "/api/compare": app.compare,
            "/api/deltas/upload": lambda b: dl.describe(
                uploads.save_delta_upload(b, app.logs / "app_uploads" / "deltas")
            ).public(app.logs),
        }
        if path not in routes:
            return self._json({"error": f"not found: {path}"}, 404)
        return self._json(routes[path](body))


def make_server(app: App, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"app": app})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
