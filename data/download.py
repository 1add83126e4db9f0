"""Fetching candidate images from URLs (or local files) safely, for retrieval.

:func:`fetch_image` returns either the bytes of a real, decodable image of at least ``min_side``
pixels, or the one-line reason it was refused and whether that reason may pass (a timeout, a
dropped connection, HTTP 429/5xx: retried ``retries`` times with back-off, and worth another try
in a later run) or not (404, an HTML page, a truncated or oversized file: never retried).

Every attempt is bounded: ``timeout`` seconds to connect and between bytes, a wall-clock
deadline of ``3 * timeout`` for the whole body (a server dripping bytes cannot stall a run), and
``max_bytes`` checked against ``Content-Length`` before reading and again while streaming.
``file://`` URLs and plain paths are read from disk with the same checks, so an index of local
images needs no web server.
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import requests
from PIL import Image, UnidentifiedImageError

MAX_BYTES = 20 * 1024 * 1024
MIN_SIDE = 64  # pixels: a regularization image is resized to 512, smaller ones are mostly icons
EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif",
              "BMP": ".bmp", "TIFF": ".tif"}  # fmt: skip
TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
CHUNK = 64 * 1024


@dataclass(frozen=True)
class Fetched:
    """The outcome of :func:`fetch_image`: ``data`` (and ``ext``, ``sha1``) or ``reason``."""

    url: str
    data: bytes | None = None
    ext: str = ""
    size: tuple[int, int] = (0, 0)
    reason: str = ""
    transient: bool = False

    @property
    def ok(self) -> bool:
        return self.data is not None

    @property
    def sha1(self) -> str:
        return hashlib.sha1(self.data or b"").hexdigest()


class Refused(Exception):
    """Why a candidate is not kept (``transient``: worth another try later)."""

    def __init__(self, reason: str, transient: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.transient = reason, transient


def check_image(data: bytes, min_side: int = MIN_SIDE) -> tuple[str, tuple[int, int]]:
    """(file extension, (width, height)) of a fully decodable image, or raises :class:`Refused`."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or ""
            im.load()  # a full decode: Image.open alone accepts truncated files
            size = im.size
    except Image.DecompressionBombError:
        raise Refused("too many pixels (decompression bomb limit)") from None
    except UnidentifiedImageError:
        raise Refused("not an image") from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL's ways of saying "broken file"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise Refused(f"unreadable image ({first})") from None
    if min(size) < min_side:
        raise Refused(f"too small ({size[0]}x{size[1]}, under {min_side} px)")
    return EXTENSIONS.get(fmt, ".png"), size


def _local_path(url: str) -> Path | None:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return None if "://" in url else Path(url)


def _read_local(path: Path, max_bytes: int) -> bytes:
    if not path.is_file():
        raise Refused(f"no such file {path}")
    if path.stat().st_size > max_bytes:
        raise Refused(f"too large ({path.stat().st_size} bytes, cap {max_bytes})")
    return path.read_bytes()


def _read_http(url: str, session: requests.Session, timeout: float, max_bytes: int) -> bytes:
    deadline = time.monotonic() + 3 * timeout
    try:
        with session.get(url, stream=True, timeout=(timeout, timeout)) as r:
            if r.status_code != 200:
                raise Refused(f"HTTP {r.status_code}", r.status_code in TRANSIENT_STATUS)
            kind = r.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if kind.startswith("text/") or kind in ("application/json", "application/xml"):
                raise Refused(f"not an image (Content-Type {kind})")
            length = r.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise Refused(f"too large ({length} bytes, cap {max_bytes})")
            body = bytearray()
            for chunk in r.iter_content(CHUNK):
                body += chunk
                if len(body) > max_bytes:
                    raise Refused(f"too large (over the {max_bytes}-byte cap)")
                if time.monotonic() > deadline:
                    raise Refused(f"timed out (body not done in {3 * timeout:g} s)", True)
            return bytes(body)
    except requests.Timeout:
        raise Refused(f"timed out ({timeout:g} s)", True) from None
    except requests.ConnectionError as err:
        raise Refused(f"connection failed ({type(err).__name__})", True) from None
    except requests.RequestException as err:  # invalid URL, too many redirects, ...
        raise Refused(f"request failed ({type(err).__name__}: {err})") from None


def fetch_image(
    url: str,
    session: requests.Session | None = None,
    timeout: float = 10.0,
    max_bytes: int = MAX_BYTES,
    min_side: int = MIN_SIDE,
    retries: int = 2,
    backoff: float = 0.5,
) -> Fetched:
    """Download (or read) the image at ``url`` with the checks in the module docstring."""
    session = session or requests.Session()
    for attempt in range(retries + 1):
        try:
            local = _local_path(url)
            if local is not None:
                data = _read_local(local, max_bytes)
            else:
                data = _read_http(url, session, timeout, max_bytes)
            ext, size = check_image(data, min_side)
            return Fetched(url, data=data, ext=ext, size=size)
        except Refused as refused:
            if not refused.transient or attempt == retries:
                return Fetched(url, reason=refused.reason, transient=refused.transient)
        except OSError as err:  # a local file that cannot be read
            return Fetched(url, reason=f"unreadable file ({err.strerror or err})")
        time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")
