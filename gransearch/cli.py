"""Command line: ``gransearch eval | quantize``.

Each subcommand mirrors a Python function: ``eval`` -> :func:`gransearch.perplexity`,
``quantize`` -> :func:`gransearch.quantize`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="packaged name, .gguf file, local dir or hub id (default: smollm2-135m)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default: float32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code (off by default)")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="wiki-sample", help="wiki-sample | news-sample | wikitext2 | c4 | path.txt")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")


def _device(arg):
    import torch

    if arg:
        return arg
    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_eval(args) -> int:
    import gransearch as gs

    t0 = time.perf_counter()
    model, tok = gs.load_model(args.model, dtype=args.dtype, device=_device(args.device), trust_remote_code=args.trust_remote_code)
    ids = gs.load_tokens(args.data, tok, args.split)
    res = gs.perplexity(model, ids, seqlen=args.seqlen, batch_size=args.batch_size, max_windows=args.max_windows, verbose=not args.quiet)
    out = {
        "model": args.model,
        "data": f"{args.data}:{args.split}",
        "seqlen": args.seqlen,
        "perplexity": round(res.ppl, 4),
        "tokens_evaluated": res.n_tokens,
        "windows": res.n_windows,
        "eval_seconds": round(res.seconds, 1),
        "tokens_per_second": round(res.n_windows * res.seqlen / res.seconds, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>18}: {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gransearch", description="Measure and search per-layer LLM quantization.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress events")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("eval", help="perplexity of a model on a text split")
    _add_model_args(p)
    _add_eval_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as exc:
        print(f"gransearch: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
