"""Ship a pretrained toy base: ``python -m toyworld.export_base RUN_CKPT [OUT]``.

Weights are stored in float16 to stay small (the diffusion-schedule buffers and the latent
``scale_factor`` stay float32); loading casts them back to the model's dtype.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ldm.checkpoint import load_state_dict, save_state_dict

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "models" / "toy" / "toy_base.safetensors"
FP32_KEYS = {"scale_factor"}


def export(src: str | Path, out: str | Path = DEFAULT_OUT) -> Path:
    sd = load_state_dict(src)
    shipped = {
        k: v.half() if v.is_floating_point() and "." in k and k not in FP32_KEYS else v.float()
        for k, v in sd.items()
    }  # top-level keys without a dot are the DDPM buffers
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_state_dict(shipped, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="a toy_pretrain checkpoint (.safetensors)")
    parser.add_argument("out", nargs="?", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    path = export(args.src, args.out)
    size = path.stat().st_size / 2**20
    n = sum(v.numel() for v in load_state_dict(path).values())
    print(f"wrote {path} ({size:.1f} MiB, {n:,} values)")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
