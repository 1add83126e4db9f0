"""Real regularization images retrieved from a clip-retrieval backend (the reference's
``src/retrieve.py``), resumable and robust::

    python -m data.retrieve --class_prompt "cat" --num 200 --outpath real_reg/samples_cat \\
        [--backend_url URL] [--indice_name NAME] [--aesthetic_score 9 --aesthetic_weight 0.1]

The class prompt is sent as a text query to ``/knn-service`` (matched against image embeddings),
``2 * num`` candidates first and 1.5x more while candidates run out, as the reference does. Each
candidate's URL is fetched with :func:`data.download.fetch_image` (timeouts, size cap, decode and
size checks, retries) by a few threads; images identical to one already kept (same URL or same
bytes) are skipped. ``outpath`` gets the reference layout: ``images/00000.jpg ...`` and aligned
``images.txt`` (absolute paths), ``caption.txt`` (each image's own caption, newlines removed),
``urls.txt``, plus ``retrieval.json`` with the refused URLs and why.

Resume: images already listed in ``outpath`` (by this tool or the original ones) are kept and
count towards ``num``; with enough of them the backend is not even contacted. Refused URLs are
not fetched again unless ``--retry_failed`` (after timeouts, or with a larger ``--max_bytes``).

The default backend is a local one (``python -m data.retrieval_index serve``): LAION's public
service (``--backend_url https://knn.laion.ai/knn-service --indice_name laion_400m``, the
reference's) has been down since 2024. The request is the JSON that clip-retrieval's
``ClipClient`` sends; ``--client clip_retrieval`` sends it through ``ClipClient`` itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import requests
from tqdm import tqdm

from data.datasets import resolve_listed
from data.download import MAX_BYTES, MIN_SIDE, Fetched, Refused, check_image, fetch_image

log = logging.getLogger(__name__)

DEFAULT_URL = os.environ.get("CLIP_RETRIEVAL_URL", "http://127.0.0.1:1234/knn-service")
ALTERNATIVES = (
    "alternatives: serve a local index of your own images (python -m data.retrieval_index "
    "build|serve, README 'Retrieval'), use generated regularization (--config-name "
    "finetune_gen), or point class_data_dir at a folder of images"
)
MANIFEST = "retrieval.json"
EXTRA_HINT = "install the retrieval extra: pip install -r requirements-retrieval.txt"


class RetrievalError(RuntimeError):
    """A retrieval that cannot proceed; the message is one line."""


@dataclass
class KnnClient:
    """A clip-retrieval ``/knn-service`` client sending exactly ``ClipClient``'s request, with
    a timeout and one-line errors, and without importing clip_retrieval (5 s, torchvision).

    ``indice_name=None`` asks for the backend's first index. Defaults are the reference's
    (aesthetic weight 0.1, ClipClient's other defaults); a backend without aesthetic
    embeddings, safety model or violence detector ignores those options.
    """

    url: str = DEFAULT_URL
    indice_name: str | None = None
    aesthetic_score: int | None = 9
    aesthetic_weight: float | None = 0.1
    modality: str = "image"
    deduplicate: bool = True
    use_safety_model: bool = True
    use_violence_detector: bool = True
    use_mclip: bool = False
    timeout: float = 120.0

    def payload(self, text: str, num_images: int) -> dict[str, Any]:
        aesthetic = self.aesthetic_score is not None and self.aesthetic_weight is not None
        return {
            "text": text, "image": None, "image_url": None, "embedding_input": None,
            "deduplicate": self.deduplicate, "use_safety_model": self.use_safety_model,
            "use_violence_detector": self.use_violence_detector,
            "indice_name": self.indice_name, "use_mclip": self.use_mclip,
            "aesthetic_score": self.aesthetic_score if aesthetic else "",
            "aesthetic_weight": self.aesthetic_weight if aesthetic else "",
            "modality": self.modality, "num_images": num_images, "num_result_ids": num_images,
        }  # fmt: skip

    def unreachable(self, err: Exception) -> RetrievalError:
        return RetrievalError(
            f"clip-retrieval backend unreachable at {self.url} ({type(err).__name__}); "
            + ALTERNATIVES
        )

    def served_indices(self) -> str:
        base = self.url.rsplit("/knn-service", 1)[0]
        try:
            return f" (served indices: {requests.get(base + '/indices-list', timeout=5).json()})"
        except (requests.RequestException, ValueError):
            return ""

    def query(self, text: str, num_images: int) -> list[dict[str, Any]]:
        body = json.dumps(self.payload(text, num_images))
        try:
            r = requests.post(self.url, data=body, timeout=self.timeout)
        except (requests.ConnectionError, requests.Timeout) as err:
            raise self.unreachable(err) from None
        if r.status_code != 200:
            raise RetrievalError(
                f"clip-retrieval backend at {self.url} answered HTTP {r.status_code} for index "
                f"{self.indice_name!r}{self.served_indices()}"
            )
        try:
            results = r.json()
        except ValueError:
            raise RetrievalError(f"{self.url} is not a clip-retrieval backend (not JSON)") from None
        if not isinstance(results, list):
            raise RetrievalError(f"clip-retrieval backend at {self.url} answered {results!r:.200}")
        return results


class ClipRetrievalClient(KnnClient):
    """The same query sent through clip_retrieval's own ``ClipClient`` (needs the extra)."""

    def query(self, text: str, num_images: int) -> list[dict[str, Any]]:
        try:
            from clip_retrieval.clip_client import ClipClient, Modality
        except ImportError as err:
            raise RetrievalError(f"--client clip_retrieval: {err}; {EXTRA_HINT}") from None

        options = asdict(self)
        options.pop("timeout")  # ClipClient waits up to an hour
        options.update(modality=Modality(self.modality), num_images=num_images)
        try:
            return ClipClient(**options).query(text=text)
        except (requests.ConnectionError, requests.Timeout) as err:
            raise self.unreachable(err) from None


CLIENTS = {"knn": KnnClient, "clip_retrieval": ClipRetrievalClient}


@dataclass
class Row:
    path: Path
    caption: str
    url: str


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def _atomic_write(path: Path, data: str | bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def read_rows(out: Path) -> list[Row]:
    """The images already listed in ``out`` that still decode (any tool's reference layout)."""
    if not (out / "images.txt").exists():
        return []
    lines = [p for p in (out / "images.txt").read_text().splitlines() if p.strip()]

    def column(name: str) -> list[str]:
        f = out / name
        values = f.read_text().splitlines() if f.exists() else []
        return values + [""] * (len(lines) - len(values))

    rows = []
    for line, caption, url in zip(lines, column("caption.txt"), column("urls.txt"), strict=False):
        path = resolve_listed(out, line)
        try:
            check_image(path.read_bytes(), min_side=1)
        except (OSError, Refused) as err:  # gone or broken: its place is fetched again
            log.info("%s: dropping listed image %s (%s)", out, line, err)
            continue
        rows.append(Row(path.resolve(), caption.strip(), url.strip()))
    return rows


def write_rows(out: Path, rows: list[Row], manifest: dict[str, Any]) -> None:
    """The three aligned lists (``images.txt`` last: it marks a usable folder) + manifest."""
    _atomic_write(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    _atomic_write(out / "caption.txt", "".join(f"{r.caption}\n" for r in rows))
    _atomic_write(out / "urls.txt", "".join(f"{r.url}\n" for r in rows))
    _atomic_write(out / "images.txt", "".join(f"{r.path}\n" for r in rows))


def _load_manifest(out: Path, class_prompt: str) -> dict[str, Any]:
    f = out / MANIFEST
    manifest = json.loads(f.read_text()) if f.exists() else {}
    other = manifest.get("class_prompt", class_prompt)
    if other != class_prompt:
        raise RetrievalError(f"{out} holds images retrieved for {other!r}, not {class_prompt!r}")
    return {"class_prompt": class_prompt, "rejected": manifest.get("rejected", {})}


def _next_number(images: Path) -> int:
    numbers = [int(p.stem) for p in images.iterdir() if p.stem.isdigit()]
    return max(numbers, default=-1) + 1


def retrieve(
    class_prompt: str,
    num: int,
    outpath: str | Path,
    client: KnnClient | None = None,
    timeout: float = 10.0,
    max_bytes: int = MAX_BYTES,
    min_side: int = MIN_SIDE,
    retries: int = 2,
    workers: int = 8,
    retry_failed: bool = False,
    max_candidates: int = 10_000,
    progress: bool = True,
) -> list[Row]:
    """Fill ``outpath`` with up to ``num`` images for ``class_prompt``; returns its rows."""
    out = Path(outpath)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    manifest = _load_manifest(out, class_prompt)
    rows = read_rows(out)
    if len(rows) >= num:
        log.info("%s already holds %d images for %r", out, len(rows), class_prompt)
        return rows
    client = client or KnnClient()
    rejected: dict[str, dict[str, Any]] = manifest["rejected"]
    known = {r.url for r in rows} | (set() if retry_failed else set(rejected))
    hashes = {hashlib.sha1(r.path.read_bytes()).hexdigest() for r in rows}
    number = _next_number(images)
    ask, tried, bar = 2 * num, set(), None
    local = threading.local()  # one requests.Session per download thread

    def fetch(url: str) -> Fetched:
        local.session = getattr(local, "session", None) or requests.Session()
        return fetch_image(url, local.session, timeout, max_bytes, min_side, retries)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        while len(rows) < num:
            results = client.query(class_prompt, ask)
            if bar is None:  # after the first answer: an unreachable backend shows no bar
                bar = tqdm(total=num, initial=len(rows), desc=f"retrieving {class_prompt!r}",
                           disable=not progress, unit="img")  # fmt: skip
            fresh: list[tuple[str, str]] = []
            for r in results:
                url = one_line(r.get("url") or r.get("image_path") or "")
                if url and url not in known and url not in tried:
                    tried.add(url)
                    fresh.append((url, one_line(r.get("caption") or "") or class_prompt))
            exhausted = not fresh and len(results) < ask
            while fresh and len(rows) < num:
                chunk, fresh = fresh[: max(workers, 1)], fresh[max(workers, 1) :]
                fetched = list(pool.map(fetch, [url for url, _ in chunk]))
                for (url, caption), got in zip(chunk, fetched, strict=True):
                    if len(rows) >= num:
                        break
                    if got.ok and got.sha1 in hashes:
                        got = Fetched(url, reason="same bytes as an image already kept")
                    if not got.ok:
                        rejected[url] = {"reason": got.reason, "transient": got.transient}
                        log.debug("refused %s: %s", url, got.reason)
                        continue
                    rejected.pop(url, None)
                    path = (images / f"{number:05d}{got.ext}").resolve()
                    _atomic_write(path, got.data)
                    number += 1
                    hashes.add(got.sha1)
                    rows.append(Row(path, caption, url))
                    bar.update(1)
                write_rows(out, rows, manifest)
            if len(rows) >= num or exhausted or ask >= max_candidates:
                break
            ask = min(int(ask * 1.5), max_candidates)
    if bar is not None:
        bar.close()
    write_rows(out, rows, manifest)
    _report(out, class_prompt, num, rows, rejected)
    return rows


def _report(out: Path, prompt: str, num: int, rows: list[Row], rejected: dict) -> None:
    transient = sum(why["transient"] for why in rejected.values())
    log.info("%s: %d images for %r, %d URLs refused (see %s)", out, len(rows), prompt,
             len(rejected), MANIFEST)  # fmt: skip
    if len(rows) < num:
        log.warning(
            "only %d of %d images for %r: the backend has no more usable candidates%s",
            len(rows), num, prompt,
            f"; {transient} failed transiently (--retry_failed fetches refused URLs again)"
            if transient else "",
        )  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m data.retrieve",
        description="Real images of a class, with captions, from a clip-retrieval backend.",
    )
    p.add_argument("--class_prompt", "--target_name", required=True, help="text query")
    p.add_argument("--num", "--num_class_images", type=int, default=200)
    p.add_argument("--outpath", "--class_data_dir", required=True)
    p.add_argument("--backend_url", default=DEFAULT_URL, help="…/knn-service ($CLIP_RETRIEVAL_URL)")
    p.add_argument("--indice_name", default=None, help="default: the backend's first index")
    p.add_argument("--aesthetic_score", type=int, default=9)
    p.add_argument("--aesthetic_weight", type=float, default=0.1)
    p.add_argument("--modality", choices=["image", "text"], default="image")
    p.add_argument("--no_deduplicate", action="store_true", help="keep near-duplicate results")
    p.add_argument("--no_safety", action="store_true", help="no safety/violence filtering")
    p.add_argument("--client", choices=sorted(CLIENTS), default="knn")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per image request")
    p.add_argument("--max_bytes", type=int, default=MAX_BYTES)
    p.add_argument("--min_side", type=int, default=MIN_SIDE)
    p.add_argument("--retries", type=int, default=2)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--retry_failed", action="store_true", help="fetch refused URLs again")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(message)s")  # fmt: skip
    client = CLIENTS[args.client](
        url=args.backend_url, indice_name=args.indice_name, modality=args.modality,
        aesthetic_score=args.aesthetic_score, aesthetic_weight=args.aesthetic_weight,
        deduplicate=not args.no_deduplicate, use_safety_model=not args.no_safety,
        use_violence_detector=not args.no_safety,
    )  # fmt: skip
    try:
        retrieve(
            args.class_prompt, args.num, args.outpath, client, timeout=args.timeout,
            max_bytes=args.max_bytes, min_side=args.min_side, retries=args.retries,
            workers=args.workers, retry_failed=args.retry_failed, progress=not args.quiet,
        )  # fmt: skip
    except RetrievalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
