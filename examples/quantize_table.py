"""Whole-model quantization table: methods x specs on the packaged SmolLM2-135M (issue 4).

    python examples/quantize_table.py [--specs w8c,w4c,w4g64,w3c,w3g64] [--methods rtn,gptq,awq,awq+gptq]
                                      [--variants plain,act_order,static] [--out docs/data/quantize_table.csv]

Protocol: calibration 128 windows x 512 tokens drawn (seed 0) from the wiki-sample train split;
perplexity on the full wiki-sample test split at seqlen 512. Every configuration starts from a fresh
copy of the model. GPTQ variants: ``plain`` (groups' parameters at group boundaries), ``act_order``
(descending Hessian diagonal; with groups this implies static groups), ``static`` (static groups
without act-order). Rows already in the CSV are skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import time

import torch

import gransearch as gs

FIELDS = ["model", "method", "variant", "spec", "ppl", "delta_pct", "bits_per_weight", "linear_bytes", "quant_seconds", "eval_seconds",
          "commit", "torch", "transformers"]


def provenance() -> dict:
    """What produced a row: the checkout's commit ('+dirty' when tracked files differ from it) and the
    versions whose numerics reach the figures. A row that cannot be traced to these is not reproducible."""
    import transformers

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                               text=True, check=True).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"commit": commit, "torch": torch.__version__, "transformers": transformers.__version__}


def rows_done(path, for_append=False):
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        reader = csv.DictReader(fh)
        if for_append and reader.fieldnames and reader.fieldnames != FIELDS:
            raise SystemExit(f"{path} has the columns {reader.fieldnames}, not this script's {FIELDS}: it was written "
                             f"by another version of this script; give --out a new file to start a table")
        return {(r["method"], r["variant"], r["spec"]): r for r in reader}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--specs", default="w8c,w4c,w4g64,w3c,w3g64")
    ap.add_argument("--methods", default="rtn,gptq,awq,awq+gptq")
    ap.add_argument("--variants", default="plain", help="GPTQ variants: plain,act_order,static")
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", default="docs/data/quantize_table.csv")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--print", action="store_true", help="only print the markdown table of the CSV")
    args = ap.parse_args()
    if args.print:
        print_table(args.out)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    model, tok = gs.load_model(args.model)
    calib = gs.sample_windows(gs.load_tokens("wiki-sample", tok, "train"), args.n_calib, args.seqlen, seed=0)
    test = gs.load_tokens("wiki-sample", tok, "test")
    done = rows_done(args.out, for_append=True)
    prov = provenance()
    if any(r.get("commit") != prov["commit"] for r in done.values()):
        print(f"note: {args.out} holds rows made by another commit or before rows recorded one; the rows "
              f"added now are from {prov['commit']} (each row's commit column says which)", flush=True)
    if ("fp", "-", "fp32") not in done:
        r = gs.perplexity(model, test, seqlen=args.seqlen, batch_size=4)
        with open(args.out, "a", newline="") as fh:
            w = csv.DictWriter(fh, FIELDS)
            if fh.tell() == 0:
                w.writeheader()
            w.writerow({"model": args.model, "method": "fp", "variant": "-", "spec": "fp32", "ppl": f"{r.ppl:.4f}", "delta_pct": "0.00",
                        "bits_per_weight": "32", "linear_bytes": "", "quant_seconds": "0", "eval_seconds": f"{r.seconds:.1f}", **prov})
        done = rows_done(args.out)
    base = float(done[("fp", "-", "fp32")]["ppl"])
    del model
    for spec in args.specs.split(","):
        for method in args.methods.split(","):
            variants = args.variants.split(",") if "gptq" in method else ["plain"]
            for variant in variants:
                if variant == "static" and "g" not in spec[2:]:
                    continue  # static groups only differ from plain for per-group specs
                if (method, variant, spec) in done:
                    continue
                model, _ = gs.load_model(args.model)
                t0 = time.perf_counter()
                res = gs.quantize(model, spec, calib, method=method, act_order=variant == "act_order",
                                  static_groups=variant == "static", objective=False)
                tq = time.perf_counter() - t0
                r = gs.perplexity(model, test, seqlen=args.seqlen, batch_size=4)
                n_w = sum(rec.shape[0] * rec.shape[1] for rec in res.records)
                row = {"model": args.model, "method": method, "variant": variant, "spec": spec, "ppl": f"{r.ppl:.4f}",
                       "delta_pct": f"{100 * (r.ppl / base - 1):.2f}", "bits_per_weight": f"{8 * res.nbytes / n_w:.3f}",
                       "linear_bytes": res.nbytes, "quant_seconds": f"{tq:.1f}", "eval_seconds": f"{r.seconds:.1f}", **prov}
                with open(args.out, "a", newline="") as fh:
                    csv.DictWriter(fh, FIELDS).writerow(row)
                print(row, flush=True)
                del model
    print_table(args.out)


def print_table(path):
    """Rows grouped by spec; 'of RTN's increase' is the share of RTN's perplexity increase removed."""
    rows = list(rows_done(path).values())
    fp = next(float(r["ppl"]) for r in rows if r["method"] == "fp")
    rtn = {r["spec"]: float(r["ppl"]) for r in rows if r["method"] == "rtn"}
    order = {"fp": 0, "rtn": 1, "gptq": 2, "awq": 3, "awq+gptq": 4}
    print(f"unquantized (fp32): perplexity {fp:.3f}\n")
    print("| spec | method | variant | perplexity | change | removed of RTN's increase | bits/weight | quantize s | commit |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    for r in sorted((r for r in rows if r["method"] != "fp"), key=lambda r: (r["spec"], order[r["method"]], r["variant"])):
        p = float(r["ppl"])
        base = rtn.get(r["spec"])
        # the share is meaningless when RTN itself barely moves the perplexity (8 bits)
        removed = f"{100 * (base - p) / (base - fp):.0f}%" if base is not None and r["method"] != "rtn" and base > 1.01 * fp else "-"
        print(f"| {r['spec']} | {r['method']} | {r['variant']} | {p:.3f} | {float(r['delta_pct']):+.2f}% | {removed} | {r['bits_per_weight']} | {r['quant_seconds']} | {r.get('commit') or '-'} |")
    print_summary(rows)


def print_summary(rows):
    """The README's table: test perplexity by spec (8 bits first; groups before channels) and method."""
    cols = [("rtn", "plain", "RTN"), ("gptq", "plain", "GPTQ"), ("gptq", "act_order", "GPTQ act-order"), ("awq", "plain", "AWQ"),
            ("awq+gptq", "plain", "AWQ+GPTQ")]
    ppl = {(r["spec"], r["method"], r["variant"]): float(r["ppl"]) for r in rows}
    specs = sorted({r["spec"] for r in rows if r["method"] != "fp"}, key=lambda s: (-int(s[1]), s.endswith("c"), s))
    print("\n| spec | " + " | ".join(c[2] for c in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for spec in specs:
        cells = [f"{ppl[(spec, m, v)]:.2f}" if (spec, m, v) in ppl else "-" for m, v, _ in cols]
        print(f"| {spec} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
