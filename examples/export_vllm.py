"""The servable search on SmolLM2: a `vllm`-profile plan at the bytes of uniform w4g64, exported as
compressed-tensors, loaded back by transformers, against the `research` search and the best uniform.

    python examples/export_vllm.py --out runs/export [--profile vllm-asym] [--trials 20] [--device cuda]
    python examples/export_vllm.py --report runs/export      # the table of docs/export.md

Protocol (that of docs/search.md): SmolLM2-135M-Instruct from the packaged GGUF, computed in float32;
calibration 128 x 512 tokens of wiki-sample train (seed 0); candidates RTN, GPTQ (act-order) and AWQ
at what the profile allows of bits 3, 4, 8 x per-channel and groups of 32 and 64; proxy 16 x 512
validation tokens; the best plan by proxy re-quantized sequentially (as a user applies it), measured
on the whole test split at seqlen 512, and that model exported. Killed, the same command resumes (the bank and the study are in --out). The budget is the size of uniform w4g64 *as the vllm profile counts it*: the
compressed-tensors tensors (int32-packed codes, float16 scales, packed zero points, shapes) plus
the floating-point tensors at float32, the dtype the packaged model is published in here (the
tied 49152 x 576 embedding is 113 MB of it; ``--float-dtype bfloat16`` counts and writes it at half).
The research row is docs/data/search/cpu/budget-w4g64 (the same protocol, its own byte layout, at
uniform w4g64's size in that layout); the uniform row is docs/data/quantize_table.csv.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import time

import torch

import gransearch as gs


def run(args) -> None:
    os.makedirs(args.out, exist_ok=True)
    model, tok = gs.load_model("smollm2-135m")
    calib = gs.sample_windows(gs.load_tokens("wiki-sample", tok, "train"), 128, 512, seed=0)
    val = gs.load_tokens("wiki-sample", tok, "validation")
    test = gs.load_tokens("wiki-sample", tok, "test")
    budget = gs.runs.budget_like(model, "w4g64", args.profile, args.float_dtype)
    t0 = time.perf_counter()
    # no final stage inside optimize: the best plan is re-quantized once below, measured on the test
    # split (the final stage's protocol) and that same model is exported
    res = gs.optimize(model, budget_bytes=budget, calib=calib, eval_ids=val, final_ids=None, methods=("rtn", "gptq", "awq"),
                      bits=(3, 4, 8), granularities=("channel", 32, 64), n_trials=args.trials, n_final=0, profile=args.profile,
                      float_dtype=args.float_dtype, storage=f"sqlite:///{os.path.abspath(args.out)}/study.db",
                      study_name="export-vllm", bank_dir=os.path.join(args.out, "bank"), device=args.device)
    search_s = time.perf_counter() - t0
    res.plan.save(os.path.join(args.out, "plan.json"))
    # the best plan as a user applies it, written, and read back by transformers
    gs.quantize(model, res.plan, calib, device=args.device, objective=False)
    saved = gs.save_quantized(model, os.path.join(args.out, "checkpoint"), dtype=args.float_dtype, tokenizer=tok, profile=args.profile)
    ours = gs.perplexity(model, test, seqlen=512, batch_size=4).ppl
    symmetric = all(lp.spec.symmetric for lp in res.plan.layers.values())
    hf = gs.export.load_in_transformers(os.path.join(args.out, "checkpoint"), device=args.device or "cpu")
    theirs = gs.perplexity(hf, test, seqlen=512, batch_size=4).ppl
    with torch.no_grad():
        x = test[:512].unsqueeze(0).to(args.device or "cpu")
        max_logit = float((model(x).logits.float() - hf(x).logits.float()).abs().max())
    by_type = collections.defaultdict(collections.Counter)
    for name, lp in res.plan.layers.items():
        by_type[name.rsplit(".", 1)[-1]][f"{lp.method}:{lp.spec}"] += 1
    summary = {"budget_bytes": budget, "plan_bytes": res.nbytes, "proxy_ppl": res.proxy_ppl, "final_ppl": ours, "trials": res.n_trials,
               "saved_tensor_bytes": saved.quantized_nbytes + saved.float_nbytes, "saved_file_bytes": saved.file_nbytes,
               "float_dtype": saved.float_dtype, "test_ppl_gransearch": ours, "test_ppl_transformers": theirs,
               "ppl_rel_diff": abs(theirs / ours - 1), "max_logit_diff": max_logit, "transformers_path": "compressed" if symmetric else "dequantize",
               "search_seconds": search_s, "bank_seconds": res.bank_seconds, "by_type": {k: dict(v.most_common()) for k, v in by_type.items()},
               "device": args.device or "cpu", "torch": torch.__version__, "profile": args.profile}
    with open(os.path.join(args.out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    print(json.dumps(summary, indent=1))


def report(folder: str) -> None:
    s = json.load(open(os.path.join(folder, "summary.json")))
    here = os.path.dirname(os.path.abspath(__file__))
    r = json.load(open(os.path.join(here, "..", "docs", "data", "search", "cpu", "budget-w4g64", "summary.json")))
    rows = list(csv.DictReader(open(os.path.join(here, "..", "docs", "data", "quantize_table.csv"))))
    uni = min((x for x in rows if x["spec"] == "w4g64"), key=lambda x: float(x["ppl"]))
    print("| plan | accounting | budget bytes | plan bytes | test ppl |")
    print("|---|---|---:|---:|---:|")
    print(f"| best uniform w4g64 ({uni['method']}, {uni['variant']}) | gransearch layout, floats float32 | - | - | {float(uni['ppl']):.3f} |")
    print(f"| research search | gransearch layout, floats float32 | {r['budget_bytes']:,} | {r['plan_bytes']:,} | {r['final_ppl']:.3f} |")
    print(f"| {s.get('profile', 'vllm-asym')} search | compressed-tensors, floats {s['float_dtype']} | {s['budget_bytes']:,} | {s['plan_bytes']:,} | {s['final_ppl']:.3f} |")
    print()
    print(f"exported checkpoint: {s['saved_tensor_bytes']:,} tensor bytes ({s['saved_file_bytes']:,} bytes of file); "
          f"test ppl {s['test_ppl_gransearch']:.4f} in gransearch, {s['test_ppl_transformers']:.4f} in transformers "
          f"({s['transformers_path']} path): relative difference {s['ppl_rel_diff']:.2e}, max logit difference {s['max_logit_diff']:.2e}")
    print()
    print("| layer | choices |")
    print("|---|---|")
    for k, v in s["by_type"].items():
        print(f"| {k} | {', '.join(f'{n} x {c}' for c, n in v.items())} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/export")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--profile", default="vllm-asym", choices=("vllm", "vllm-asym"))
    ap.add_argument("--device", default=None)
    ap.add_argument("--float-dtype", default=None, choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--report", default=None, help="print the tables from a finished --out folder")
    a = ap.parse_args()
    report(a.report) if a.report else run(a)
