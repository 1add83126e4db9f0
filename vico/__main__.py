"""Convert ViCo checkpoints between our ``.safetensors`` and the reference's ``.pt`` pair.

python -m vico to-reference last.safetensors OUT_DIR [--step N] [--token-id 265]
python -m vico from-reference DIR|embeddings_gs-N.pt OUT.safetensors [--step N]
python -m vico info CKPT
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ldm.checkpoint import UnsafeCheckpointError, save_state_dict
from vico.formats import read_vico, to_reference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vico", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    to = sub.add_parser("to-reference", help="write embeddings_gs-N.pt + cross_attention-N.pt")
    to.add_argument("ckpt", type=Path)
    to.add_argument("out", type=Path)
    to.add_argument("--step", type=int, default=None, help="N (default: the checkpoint's step)")
    to.add_argument("--token-id", type=int, default=265, help="the placeholder's CLIP id")
    back = sub.add_parser("from-reference", help="read a reference pair into one .safetensors")
    back.add_argument("src", type=Path)
    back.add_argument("out", type=Path)
    back.add_argument("--step", type=int, default=None)
    info = sub.add_parser("info", help="print a checkpoint's metadata and tensor count")
    info.add_argument("ckpt", type=Path)
    info.add_argument("--step", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "to-reference":
            tensors, meta = read_vico(args.ckpt)
            paths = to_reference(tensors, meta, args.out, args.step, args.token_id)
            print("\n".join(str(p) for p in paths))
        elif args.command == "from-reference":
            tensors, meta = read_vico(args.src, args.step)
            save_state_dict(tensors, args.out, metadata=meta)
            print(args.out)
        else:
            tensors, meta = read_vico(args.ckpt, args.step)
            n = sum(t.numel() for t in tensors.values())
            print(json.dumps({**meta, "tensors": len(tensors), "parameters": n}, indent=2))
    except (OSError, ValueError, UnsafeCheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
