"""Convert SD v1 weights between the CompVis layout and a diffusers pipeline folder.

The command line of :mod:`ldm.convert`::

    python -m ldm.convert --to diffusers SRC.(ckpt|safetensors) OUT_DIR [--config sd15|PATH]
    python -m ldm.convert --to compvis SRC_DIR OUT.(safetensors|ckpt)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ldm.checkpoint import load_state_dict, save_state_dict
from ldm.convert.folders import _nonempty, read_diffusers, write_diffusers


def main(argv: list[str] | None = None) -> int:
    """``python -m ldm.convert``; prints the written path, or one error line and returns 1."""
    ap = argparse.ArgumentParser(prog="python -m ldm.convert", description=__doc__.split("\n")[0])
    ap.add_argument("--to", choices=("diffusers", "compvis"), required=True)
    ap.add_argument("src", help="CompVis .ckpt/.safetensors, or a diffusers folder (--to compvis)")
    ap.add_argument("out", help="diffusers folder, or .safetensors/.ckpt file (--to compvis)")
    ap.add_argument("--config", default="sd15", help="model config: name in configs/model or YAML")
    ap.add_argument("--ema", action="store_true", help="export the model_ema.* UNet weights")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.to == "diffusers":
            from ldm import resolve_model_config

            cfg = resolve_model_config(args.config)
            sd = load_state_dict(args.src)
            out = write_diffusers(sd, cfg, args.out, overwrite=args.overwrite, use_ema=args.ema)
        else:
            src, out = Path(args.src), Path(args.out)
            if not src.is_dir():
                raise ValueError(f"{src}: --to compvis expects a diffusers folder")
            if _nonempty(out) and not args.overwrite:
                raise FileExistsError(f"{out} exists (use --overwrite to replace it)")
            save_state_dict(read_diffusers(src)[0], out)
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        print(f"error: {lines[0]}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
