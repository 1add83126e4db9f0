"""Custom Diffusion deltas on the command line::

    python -m custom extract FULL.(ckpt|safetensors) -o DELTA [--freeze-model auto] [--tokens T..]
    python -m custom compress DELTA -o OUT [--ratio 0.6 | --rank R]
    python -m custom compose D1 D2 [...] -o OUT --categories "cat+dog" --reg-captions FILE
                      [--templates "a photo of a {}" "a {}"]
    python -m custom export DELTA --format compvis|adobe|diffusers -o OUT
    python -m custom import SRC --format compvis|adobe|diffusers -o DELTA [--tokens T..]
    python -m custom info DELTA

The base model is ``--config`` (a name in configs/model or a YAML; default sd15) with weights
``--base`` (a .ckpt / .safetensors / diffusers folder; default the config's own ``ckpt``). It
is loaded only when needed: to check a delta against it, to compress or expand, to compose,
and to fingerprint other tools' files. Errors are one ``error:`` line and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from custom import formats


def _base_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", help="base weights (.ckpt, .safetensors or diffusers folder)")
    p.add_argument("--config", default="sd15", help="model config name or YAML (default sd15)")
    p.add_argument("--force", action="store_true", help="go on when the base does not match")


def _out(p: argparse.ArgumentParser, what: str = "output delta (.safetensors)") -> None:
    p.add_argument("-o", "--out", required=True, help=what)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m custom",
        description=__doc__.replace("::", ":"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("extract", help="delta from a full fine-tuned checkpoint")
    p.add_argument("src")
    p.add_argument("--freeze-model", default="auto", help="auto, crossattn_kv or crossattn")
    p.add_argument("--tokens", nargs="+", help="names of the new token rows, in order")
    _base_args(p), _out(p)
    p = sub.add_parser("compress", help="low-rank SVD of the difference from the base")
    p.add_argument("src")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ratio", type=float, default=0.6, help="singular-value sum kept (0.6)")
    g.add_argument("--rank", type=int, help="fixed rank instead of the ratio rule")
    _base_args(p), _out(p)
    p = sub.add_parser("compose", help="closed-form merge of several deltas")
    p.add_argument("src", nargs="+")
    p.add_argument("--categories", required=True, help='one per token, "+"-separated')
    p.add_argument("--reg-captions", required=True, help="regularization captions, one a line")
    p.add_argument("--n-reg", type=int, default=200, help="captions used (first N)")
    p.add_argument("--tokens", nargs="+", help="rename the deltas' tokens (all, in order)")
    p.add_argument("--templates", nargs="+", help='target prompts, {} = "<token> <category>" '
                   '(default: the reference\'s "{}" and "a photo of {}")')  # fmt: skip
    p.add_argument("--target-padding", type=int, default=0, metavar="K",
                   help="also constrain K padding positions after each target prompt's end "
                   "token (default 0: the reference)")  # fmt: skip
    p.add_argument("--report", help="report JSON (default: OUT with .json)")
    _base_args(p), _out(p)
    p = sub.add_parser("export", help="write a delta in another tool's format")
    p.add_argument("src")
    p.add_argument("--format", required=True, choices=formats.FORMATS)
    _base_args(p), _out(p, "output file (compvis, adobe) or folder (diffusers)")
    p = sub.add_parser("import", help="read another tool's delta file")
    p.add_argument("src")
    p.add_argument("--format", required=True, choices=formats.FORMATS)
    p.add_argument("--tokens", nargs="+", help="token names (files that have none)")
    _base_args(p), _out(p)
    p = sub.add_parser("info", help="print a delta's header and tensors")
    p.add_argument("src")
    return ap


def _check_out(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists (use --overwrite to replace it)")
    return out


def _unet_params(config: str) -> dict:
    from ldm import resolve_model_config

    return resolve_model_config(config)["unet_config"]["params"]


def _load_checked(path: str, base, force: bool) -> formats.Delta:
    from custom.base import check_base

    delta = formats.Delta.load(path)
    check_base(delta, base, path, force)
    return delta


def _info(args: argparse.Namespace) -> str:
    delta = formats.Delta.load(args.src)
    shapes = {k: list(v.shape) for k, v in delta.tensors.items()}
    return json.dumps({"metadata": delta.meta, "tensors": shapes}, indent=2)


def _extract(args: argparse.Namespace) -> str:
    from custom.base import load_base
    from custom.extract import extract, read_full_checkpoint

    out = _check_out(args)
    base = load_base(args.base, args.config)
    full, step = read_full_checkpoint(args.src)
    delta = extract(full, base, args.freeze_model, args.tokens, step, args.force)
    return str(delta.save(out))


def _compress(args: argparse.Namespace) -> str:
    from custom.base import load_base
    from custom.compress import compress, nbytes

    out = _check_out(args)
    base = load_base(args.base, args.config)
    delta = _load_checked(args.src, base, args.force)
    tensors, meta = compress(delta.tensors, delta.meta, base.state_dict(), args.ratio, args.rank)
    formats.Delta(tensors, delta.tokens, meta).save(out)
    ranks = json.loads(meta["ranks"]).values()
    return (
        f"{out}: {nbytes(tensors) / 1e6:.3f} MB, {nbytes(tensors) / nbytes(delta.tensors):.3f} "
        f"of the full delta; ranks {min(ranks)}-{max(ranks)}"
    )


def _compose(args: argparse.Namespace) -> str:
    from custom.base import full_values, load_base
    from custom.compose import compose, format_report

    out = _check_out(args)
    base = load_base(args.base, args.config)
    deltas = [full_values(_load_checked(p, base, args.force), base) for p in args.src]
    if args.tokens:
        n = sum(len(d.tokens) for d in deltas)
        if len(args.tokens) != n:
            raise ValueError(f"--tokens: {n} names needed, got {len(args.tokens)}")
        names = iter(args.tokens)
        deltas = [formats.Delta(d.tensors, [next(names) for _ in d.tokens], d.meta) for d in deltas]
    captions = Path(args.reg_captions).read_text().splitlines()
    categories = [c.strip() for c in args.categories.split("+")]
    sources = json.dumps(args.src)
    merged, report = compose(deltas, base, categories, captions, args.n_reg, args.templates,
                             args.target_padding, composed_from=sources)  # fmt: skip
    merged.save(out)
    report_path = Path(args.report) if args.report else out.with_suffix(".json")
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return f"{format_report(report)}\nwrote {out} and {report_path}"


def _export(args: argparse.Namespace) -> str:
    from custom.base import full_values, load_base
    from custom.compress import is_compressed

    out = _check_out(args)
    delta = formats.Delta.load(args.src)
    params = _unet_params(args.config) if args.format != "compvis" else None
    if args.format != "compvis" and is_compressed(delta.meta):  # these formats hold full W
        base = load_base(args.base, args.config)
        delta = full_values(_load_checked(args.src, base, args.force), base, args.force)
    return str(formats.export(delta, args.format, out, params, args.overwrite))


def _import_verb(args: argparse.Namespace) -> str:
    out = _check_out(args)
    return str(_import(args).save(out))


VERBS = {
    "info": _info,
    "extract": _extract,
    "compress": _compress,
    "compose": _compose,
    "export": _export,
    "import": _import_verb,
}


def _import(args: argparse.Namespace) -> formats.Delta:
    """Another tool's file as our delta; its base is fingerprinted unless the file is ours."""
    from custom.base import check_base, load_base
    from custom.compress import compressed_keys, is_compressed, kv_hash
    from custom.delta import make_metadata

    params = _unet_params(args.config) if args.format != "compvis" else None
    delta = formats.read(args.src, args.format, params, args.tokens)
    if "base_hash" in delta.meta and not args.base:
        return delta
    base = load_base(args.base, args.config)
    fields = {k: v for k, v in delta.meta.items() if k not in ("base_hash", "tokens")}
    fields.pop("delta_format", None)
    method, step = fields.pop("method", "custom_diffusion"), int(fields.pop("step", 0))
    full = any(".attn2.to_q." in k for k in delta.tensors)
    fields.setdefault("freeze_model", "crossattn" if full else "crossattn_kv")
    fields.setdefault("imported_from", f"{args.format}:{Path(args.src).name}")
    if is_compressed(delta.meta) and "kv_base_hash" not in fields:
        fields["kv_base_hash"] = kv_hash(base.state_dict(), compressed_keys(delta.tensors))
    found = check_base(delta, base, args.src, args.force)
    return formats.Delta(
        delta.tensors, delta.tokens, make_metadata(found, delta.tokens, method, step, **fields)
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        print(VERBS[args.verb](args))
    except (OSError, ValueError, TypeError, RuntimeError, KeyError) as exc:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        print(f"error: {lines[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
