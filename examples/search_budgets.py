"""Per-layer search on SmolLM2 at the exact sizes of uniform plans (issue 5's experiment).

    python examples/search_budgets.py [--budgets w4g64,w3g64] [--trials 60] [--out runs/search]

One candidate bank (calibration 128 x 512 tokens of wiki-sample train, seed 0) serves every budget.
For each budget, the exact stored size of the uniform plan (the same for every method), the search
runs ``--trials`` trials on 16 validation windows of 512 tokens, and the best ``--n-final`` plans are
re-quantized sequentially and measured on the whole test split at seqlen 512 -- the protocol of
examples/quantize_table.py, whose uniform rows are the baselines to compare with.
Writes per budget: plan.json, summary.json, pareto.csv; prints what the plans chose.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time

import gransearch as gs
from gransearch.search import build_bank


def describe(plan: gs.QuantPlan) -> dict:
    """Bits/granularity/method counts by layer type and by depth third."""
    by_type = collections.defaultdict(collections.Counter)
    by_depth = collections.defaultdict(collections.Counter)
    for name, lp in plan.layers.items():
        parts = name.split(".")
        block = int(parts[2])
        by_type[parts[-1]][f"{lp.method}:{lp.spec}"] += 1
        by_depth[["early(0-9)", "middle(10-19)", "late(20-29)"][min(2, block // 10)]][f"{lp.method}:{lp.spec}"] += 1
    return {"by_type": {k: dict(v.most_common()) for k, v in by_type.items()},
            "by_depth": {k: dict(v.most_common()) for k, v in by_depth.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", default="w4g64,w3g64")
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--methods", default="rtn,gptq,awq")
    ap.add_argument("--bits", default="3,4,8")
    ap.add_argument("--grans", default="channel,32,64")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--n-final", type=int, default=1)
    ap.add_argument("--out", default="runs/search")
    ap.add_argument("--device", default=None, help="cpu (default) or cuda: bank, trials and finals run there")
    args = ap.parse_args()
    model, tok = gs.load_model(args.model)
    calib = gs.sample_windows(gs.load_tokens("wiki-sample", tok, "train"), 128, 512, seed=0)
    val = gs.load_tokens("wiki-sample", tok, "validation")
    test = gs.load_tokens("wiki-sample", tok, "test")
    methods = tuple(args.methods.split(","))
    bits = tuple(int(b) for b in args.bits.split(","))
    grans = tuple(int(g) if g.isdigit() else g for g in args.grans.split(","))
    t0 = time.perf_counter()
    bank = build_bank(model, calib, methods, bits, grans, device=args.device)
    k = len(bank.keys[0])
    print(f"bank: {len(bank.layers)} layers x {k} candidates in {time.perf_counter() - t0:.0f} s", flush=True)
    for spec in args.budgets.split(","):
        out = os.path.join(args.out, f"budget-{spec}")
        os.makedirs(out, exist_ok=True)
        budget = gs.QuantPlan.uniform(model, spec, "rtn").nbytes(model)
        res = gs.optimize(model, budget_bytes=budget, calib=calib, eval_ids=val, final_ids=test, methods=methods, bits=bits,
                          granularities=grans, n_trials=args.trials, eval_windows=args.eval_windows, n_final=args.n_final, device=args.device,
                          storage=f"sqlite:///{os.path.abspath(out)}/study.db", study_name=f"budget-{spec}", bank=bank)
        res.plan.save(os.path.join(out, "plan.json"))
        summary = {"budget_like": spec, "budget_bytes": budget, "plan_bytes": res.nbytes, "proxy_ppl": res.proxy_ppl,
                   "final_ppl": res.ppl, "proxy_gap": res.proxy_gap, "finals": res.finals, "uniform_proxy": res.baselines,
                   "trials": len(res.study.trials), "search_seconds": res.search_seconds, "bank_seconds": bank.seconds,
                   "plan": res.plan.summary(), "described": describe(res.plan)}
        with open(os.path.join(out, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=1)
        with open(os.path.join(out, "pareto.csv"), "w") as fh:
            fh.write("trial,nbytes,proxy_ppl\n")
            for p in res.pareto:
                fh.write(f"{p.trial},{p.nbytes},{p.ppl:.4f}\n")
        print(json.dumps({k: summary[k] for k in ("budget_like", "budget_bytes", "plan_bytes", "proxy_ppl", "final_ppl", "uniform_proxy", "plan")}, indent=1), flush=True)


if __name__ == "__main__":
    main()
