"""Per-layer search on SmolLM2 at the exact sizes of uniform plans (issue 5's experiment).

    python examples/search_budgets.py [--budgets w4g64,w3g64] [--trials 60] [--out runs/search] [--device cuda]
    python examples/search_budgets.py --report runs/search      # tables from the run folders


One candidate bank (calibration 128 x 512 tokens of wiki-sample train, seed 0) serves every budget.
For each budget, the exact stored size of the uniform plan (the same for every method), the search
runs ``--trials`` trials on 16 validation windows of 512 tokens, and the best ``--n-final`` plans are
re-quantized sequentially and measured on the whole test split at seqlen 512 -- the protocol of
examples/quantize_table.py, whose uniform rows are the baselines to compare with.
Writes per budget: plan.json, summary.json, pareto.csv; prints what the plans chose. ``--report``
prints markdown tables from those folders against the best uniform rows of
docs/data/quantize_table.csv (the same calibration and test protocol).
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import time

import gransearch as gs
from gransearch.bank import build_bank


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


LINEAR_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "data", "quantize_table.csv")


def report(root: str, model_name: str) -> None:
    """Markdown tables of every budget-* folder under ``root``."""
    from gransearch.arch import get_module, linear_shape
    from gransearch.cost import layer_nbytes

    model, _ = gs.load_model(model_name)
    uniform = collections.defaultdict(list)
    with open(TABLE) as fh:
        for r in csv.DictReader(fh):
            if r["method"] != "fp":
                uniform[r["spec"]].append((float(r["ppl"]), f"{r['method']}{'' if r['variant'] == 'plain' else ' ' + r['variant']}"))
    rows, comp, base = [], [], []
    plans = {}
    for d in sorted(os.listdir(root)):
        if os.path.exists(os.path.join(root, d, "plan.json")):
            plans[d] = gs.QuantPlan.load(os.path.join(root, d, "plan.json"))
    bits = sorted({lp.spec.bits for p in plans.values() for lp in p.layers.values()})
    for d in sorted(os.listdir(root)):
        path = os.path.join(root, d, "summary.json")
        if not d.startswith("budget-") or not os.path.exists(path):
            continue
        with open(path) as fh:
            s = json.load(fh)
        plan = plans[d]
        shapes = {n: linear_shape(get_module(model, n)) for n in plan.layers}
        n_w = sum(o * i for o, i in shapes.values())
        lin = sum(layer_nbytes(shapes[n], lp.spec) for n, lp in plan.layers.items())
        best_u = min(uniform[s["budget_like"]]) if uniform[s["budget_like"]] else (float("nan"), "-")
        best_proxy = min(s["uniform_proxy"].items(), key=lambda kv: kv[1])
        rows.append(f"| {s['budget_like']} | {s['budget_bytes']:,} | {s['plan_bytes']:,} | {8 * lin / n_w:.3f} | {s['trials']} | "
                    f"{s['proxy_ppl']:.2f} | {best_proxy[1]:.2f} ({best_proxy[0]}) | {s['final_ppl']:.2f} | {best_u[0]:.2f} ({best_u[1]}) | "
                    f"{100 * (s['final_ppl'] / best_u[0] - 1):+.1f}% |")
        # every uniform plan of this size: test perplexity from the table, proxy where the bank has it
        bank_key = {"rtn": "rtn", "awq": "awq", "gptq act_order": "gptq"}  # the bank's GPTQ uses act-order
        for ppl, label in sorted(uniform[s["budget_like"]]):
            key = f"{bank_key[label]}:{s['budget_like']}" if label in bank_key else None
            proxy = f"{s['uniform_proxy'][key]:.2f}" if key in s["uniform_proxy"] else "-"
            base.append(f"| {s['budget_like']} | uniform {label} | {s['budget_bytes']:,} | {proxy} | {ppl:.2f} |")
        base.append(f"| {s['budget_like']} | **searched plan** | {s['plan_bytes']:,} | {s['proxy_ppl']:.2f} | **{s['final_ppl']:.2f}** |")
        for group, key in ((LINEAR_TYPES, lambda n: n.rsplit(".", 1)[-1]),
                           (("blocks 0-9", "blocks 10-19", "blocks 20-29"), lambda n: ("blocks 0-9", "blocks 10-19", "blocks 20-29")[min(2, int(n.split(".")[2]) // 10)])):
            for g in group:
                names = [n for n in plan.layers if key(n) == g]
                if not names:
                    continue
                w = {b: 0 for b in bits}
                gran = collections.Counter()
                for n in names:
                    o, i = shapes[n]
                    lp = plan.layers[n]
                    w[lp.spec.bits] += o * i
                    gran[str(lp.spec)[2:] or "t"] += o * i
                tot = sum(w.values())
                bpw = 8 * sum(layer_nbytes(shapes[n], plan.layers[n].spec) for n in names) / tot
                top = ", ".join(f"{k} {100 * v / tot:.0f}%" for k, v in gran.most_common(3))
                methods = collections.Counter(plan.layers[n].method for n in names)
                comp.append(f"| {s['budget_like']} | {g} | {bpw:.2f} | " + " | ".join(f"{100 * w[b] / tot:.0f}%" for b in bits)
                            + f" | {top} | {', '.join(f'{m} {c}' for m, c in methods.most_common())} |")
    modes = []
    for d in sorted(plans):
        db = os.path.join(root, d, "study.db")
        if os.path.exists(db):
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            st = optuna.load_study(study_name=d, storage=f"sqlite:///{os.path.abspath(db)}")

            def kind_of(t):
                return "uniform" if t.user_attrs.get("uniform") else f"knapsack: {t.params.get('objective')}"

            best = collections.defaultdict(lambda: (float("inf"), None))
            count = collections.Counter(kind_of(t) for t in st.trials)
            first = {}
            for t in st.trials:
                if t.state != optuna.trial.TrialState.COMPLETE:
                    continue
                best[kind_of(t)] = min(best[kind_of(t)], (t.value, t.number))
                # the neutral (all weights 1) knapsack of each loss: its warm start
                if t.params and all(v == 1.0 for k, v in t.params.items() if k != "objective"):
                    first.setdefault(t.params["objective"], t.value)
            for kind, (v, n) in sorted(best.items()):
                mode = kind.split(": ")[-1]
                neutral = f"{first[mode]:.2f}" if mode in first else "-"
                modes.append(f"| {d[7:]} | {kind} | {count[kind]} | {neutral} | {v:.2f} (trial {n}) |")
    print("| budget like | budget bytes | plan bytes | linear bits/weight | trials | proxy ppl (validation) | best uniform proxy | "
          "final ppl (test) | best uniform on test (docs/data/quantize_table.csv) | final vs best uniform |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print("\nEvery uniform plan of the budget's size (test perplexity from docs/data/quantize_table.csv) and the searched plan:\n")
    print("| budget | plan | bytes | proxy ppl (validation) | test ppl |\n|---|---|---:|---:|---:|")
    print("\n".join(base))
    print("\nWhat the plans chose (shares of weights; granularity: c = per-channel, g64 = groups of 64; methods count layers):\n")
    print("| budget | layers | bits/weight | " + " | ".join(f"{b}-bit" for b in bits) + " | granularity | methods |")
    print("|---|---|---:|" + "---:|" * len(bits) + "---|---|")
    print("\n".join(comp))
    if modes:
        print("\nBest proxy perplexity by kind of trial (neutral: the warm start with every weight 1):\n")
        print("| budget | kind | trials (pruned included) | neutral knapsack | best |\n|---|---|---:|---:|---:|")
        print("\n".join(modes))


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
    ap.add_argument("--report", default=None, metavar="DIR", help="print tables from the budget-* folders in DIR and exit")
    args = ap.parse_args()
    if args.report:
        report(args.report, args.model)
        return
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
                   "trials": res.n_trials, "search_seconds": res.search_seconds, "bank_seconds": bank.seconds,
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
