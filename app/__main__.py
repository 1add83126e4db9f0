"""``python -m app [--port 7860] [--host 127.0.0.1] [--sd-ckpt WEIGHTS] [--logs DIR]``.

Starts the web app on http://127.0.0.1:7860 (loopback only unless ``--host`` says otherwise).
Without Stable Diffusion weights (``--sd-ckpt``, ``$SD_CKPT`` or a file in ``models/sd/``) it
runs on the shipped toy-world base and says so on every page.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from app.methods import ROOT  # noqa: E402

SD_DIR = ROOT / "models" / "sd"
log = logging.getLogger("app")


def find_sd(arg: str | None) -> Path | None:
    """SD v1 weights: the argument, ``$SD_CKPT``, or the first in ``models/sd/``."""
    given = arg or os.environ.get("SD_CKPT")
    if given:
        path = Path(given).expanduser()
        if not path.exists():
            raise SystemExit(f"error: Stable Diffusion weights not found: {path}")
        return path.resolve()
    if SD_DIR.is_dir():
        for p in sorted(SD_DIR.iterdir()):
            if p.suffix in (".safetensors", ".ckpt") or (p / "unet").is_dir():
                return p.resolve()
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m app",
        description="The local web app: train (personalize), sample and compare in a browser.",
    )
    ap.add_argument("--host", default="127.0.0.1", help="interface (default: loopback only)")
    ap.add_argument("--port", type=int, default=7860, help="0: any free port")
    ap.add_argument("--sd-ckpt", help="Stable Diffusion v1 weights (.ckpt/.safetensors/folder)")
    ap.add_argument("--logs", default=str(ROOT / "logs"), help="runs, samples and uploads")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for sampling (0: auto)")
    args = ap.parse_args(argv)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from app.methods import load_methods, with_defaults
    from app.sampling import Base
    from app.server import App, make_server

    sd = find_sd(args.sd_ckpt)
    if sd is None:
        base = Base("toy", "toy", None)
        note = (
            "No Stable Diffusion weights were found, so the app runs on the toy-world base: a "
            "small model that draws 32x32 px coloured shapes and knows only toy-world words "
            "('a photo of a red circle and a blue square'). To use Stable Diffusion v1.x, restart "
            "with python -m app --sd-ckpt WEIGHTS (or put the weights in models/sd/)."
        )
    else:
        base = Base("sd15", "sd15", sd)
        note = f"Stable Diffusion v1 weights: {sd}. Training on a CPU is very slow; use a GPU."
    methods = with_defaults(load_methods(base=base.name), base.name)
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    app = App(base, logs, methods, note)
    server = make_server(app, args.host, args.port)
    host, port = server.server_address[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach this machine can use the app", host)
    log.info("%s", note)
    log.info("methods: %s", ", ".join(m.recipe for m in methods))
    print(f"app: serving on http://{host}:{port}/  (Ctrl-C stops it)", flush=True)

    def stop(*_: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        app.jobs.shutdown()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
