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
    gs.data.check_text_name(args.data)
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


def cmd_quantize(args) -> int:
    import os

    import gransearch as gs

    t0 = time.perf_counter()
    gs.data.check_text_name(args.data)
    gs.QuantSpec.parse(args.spec)
    dev = _device(args.device)
    model, tok = gs.load_model(args.model, dtype=args.dtype, device=dev, trust_remote_code=args.trust_remote_code)
    calib = gs.sample_windows(gs.load_tokens(args.data, tok, "train"), args.n_calib, args.calib_seqlen, seed=args.seed)
    test = gs.load_tokens(args.data, tok, args.split)
    summary = {"model": args.model, "data": f"{args.data}:{args.split}", "spec": args.spec, "method": args.method,
               "calibration": f"{args.n_calib} x {args.calib_seqlen} tokens of {args.data}:train, seed {args.seed}",
               "act_order": args.act_order, "static_groups": args.static_groups}
    if not args.skip_fp_eval:
        fp = gs.perplexity(model, test, seqlen=args.seqlen, batch_size=args.batch_size, max_windows=args.max_windows, verbose=not args.quiet)
        summary["ppl_fp"] = round(fp.ppl, 4)
    clip = args.clip if args.clip in (None, "search") else float(args.clip)
    res = gs.quantize(model, args.spec, calib, method=args.method, damp=args.damp, act_order=args.act_order,
                      static_groups=args.static_groups, clip=clip, awq_tokens=args.awq_tokens, device=dev, verbose=not args.quiet)
    q = gs.perplexity(model, test, seqlen=args.seqlen, batch_size=args.batch_size, max_windows=args.max_windows, verbose=not args.quiet)
    n_w = sum(r.shape[0] * r.shape[1] for r in res.records)
    summary.update({"ppl_quantized": round(q.ppl, 4), "tokens_evaluated": q.n_tokens, "linear_bytes": res.nbytes,
                    "bits_per_weight": round(8 * res.nbytes / n_w, 4), "quantize_seconds": round(res.seconds, 1),
                    "total_seconds": round(time.perf_counter() - t0, 1)})
    if "ppl_fp" in summary:
        summary["ppl_change_pct"] = round(100 * (q.ppl / summary["ppl_fp"] - 1), 2)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
        with open(os.path.join(args.out, "layers.json"), "w") as fh:
            json.dump([r.to_dict() for r in res.records], fh, indent=1)
    if args.json:
        print(json.dumps(summary))
    else:
        for k, v in summary.items():
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

    p = sub.add_parser("quantize", help="quantize a model (uniform spec) and report perplexity before and after")
    _add_model_args(p)
    _add_eval_args(p)
    p.add_argument("--spec", default="w4g64", help="w<bits>(t|c|g<size>)[s], e.g. w4g64, w3c, w8t (default: w4g64)")
    p.add_argument("--method", default="gptq", choices=("rtn", "gptq", "awq", "awq+gptq"))
    p.add_argument("--n-calib", type=int, default=128, help="calibration windows (default: 128)")
    p.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window (default: 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening, fraction of mean diag(H)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by descending Hessian diagonal")
    p.add_argument("--static-groups", action="store_true", help="GPTQ: group parameters from the original weights")
    p.add_argument("--clip", default=None, help="RTN/GPTQ weight clip: a ratio in (0, 1] or 'search'")
    p.add_argument("--awq-tokens", type=int, default=8192, help="calibration tokens for AWQ's scale search")
    p.add_argument("--skip-fp-eval", action="store_true", help="do not evaluate the unquantized model first")
    p.add_argument("--out", default=None, help="folder for summary.json and layers.json")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_quantize)
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
