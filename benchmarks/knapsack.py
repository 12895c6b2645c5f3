"""The search's knapsack: the solver against HiGHS on the whole table, on a real bank's tables.

    python benchmarks/knapsack.py [--bank runs/knapsack-bank] [--n-calib 16] [--tables 40] [--against DIR] [--record FILE]

Every search trial solves one multiple-choice knapsack: one candidate per layer, least summed
(weighted) loss within the byte budget. Until 2026-11-27 ``solve_knapsack`` handed the whole table
to ``scipy.optimize.milp`` (HiGHS, which stops at its default relative gap of 1e-4); it now drops
dominated candidates, fixes layers by Lagrangian reduced costs and solves the rest exactly by a
Pareto dynamic programme (:func:`gransearch.allocate.solve_knapsack`). Both run here, in the same
process, on the same tables, and the baseline is the module's own MILP step given every candidate
and HiGHS' default gap, i.e. the former solver.

Tables: SmolLM2-135M-Instruct's bank of the README search (rtn, gptq, awq x 3, 4, 8 bits x
per-channel, groups of 32 and 64: 27 candidates per layer, 210 layers), built once into ``--bank``
on ``--n-calib`` x 512 wiki-sample tokens; each table is one of the bank's loss tables (fisher,
raw, relative, in turn) weighted per layer kind and depth quarter by log-uniform weights in
[0.1, 10], as a TPE trial draws them, at the budgets of uniform w3g64, w4c and w4g64.
Printed: mean milliseconds per table, the ratio, and on how many tables each plan has the lower
loss (the largest relative excess of the other).

``--against DIR`` (a ``git worktree add DIR COMMIT``): then ``solve_knapsack`` of ``DIR``'s
``gransearch/allocate.py``, loaded into this process, and this checkout's solve all the tables back
to back, as a search's consecutive trials do (nothing else between two solves), in ``--rounds``
alternating rounds; printed: the median milliseconds per table of each, their ratio, whether
both chose the same candidates on every table, and on how many of ``--random`` random small tables
(ties, missing candidates, negative losses) they answer alike; exits 1 unless on all.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time

import numpy as np

import gransearch as gs
from gransearch.allocate import _milp, check_budget, cost_and_losses, depth_quarter, layer_kind, solve_knapsack
from gransearch.arch import block_index, model_linears
from gransearch.bank import bank_for

from eval_speed import machine  # noqa: E402  (same folder)
from vs_llmcompressor import commit  # noqa: E402  (same folder)


def loss_of(losses: np.ndarray, choice) -> float:
    return float(sum(losses[i, j] for i, j in enumerate(choice)))


def same_on_random(solvers: dict, n: int, seed: int = 1) -> dict:
    """How many of ``n`` random small tables (up to 39 layers x 9 candidates; coarse losses with
    ties and missing candidates, normal ones with negative values, rounded ones scaled per layer,
    and exponential ones with a tenth missing; capacities from below the cheapest plan to above the
    dearest) the two solvers answer alike (the same candidates, or both infeasible)."""
    rng = np.random.default_rng(seed)
    same = 0
    for t in range(n):
        L, K = int(rng.integers(1, 40)), int(rng.integers(1, 10))
        costs = rng.integers(1, 50, size=(L, K))
        if t % 4 == 0:
            losses = rng.choice([0.5, 1.0, 2.0, 3.0, np.inf], size=(L, K))
        elif t % 4 == 1:
            losses = rng.normal(size=(L, K))
        elif t % 4 == 2:
            losses = np.round(rng.exponential(size=(L, K)), 2) * np.exp(rng.uniform(-2, 2, size=(L, 1)))
        else:
            losses = rng.exponential(size=(L, K))
            losses[rng.random((L, K)) < 0.1] = np.inf
        capacity = int(rng.integers(max(int(costs.min(1).sum()) - 5, 0), int(costs.max(1).sum()) + 5))
        answers = [solve(costs, losses, capacity) for solve in solvers.values()]
        same += all(a == answers[0] for a in answers)
    return {"tables": n, "same": same}


def back_to_back(costs: np.ndarray, work: list, other: str, rounds: int, random: int = 0) -> dict:
    """Milliseconds per table of ``other``'s ``solve_knapsack`` (its ``gransearch/allocate.py``
    loaded into this process; the modules it imports are this checkout's) and of this checkout's,
    each solving every ``(losses, capacity)`` of ``work`` in turn, in ``rounds`` alternating rounds
    after one untimed round each; whether the two chose the same candidates everywhere; and on how
    many of ``random`` random tables they agree (:func:`same_on_random`)."""
    path = os.path.join(other, "gransearch", "allocate.py")
    spec = importlib.util.spec_from_file_location("gransearch._allocate_against", path)
    theirs = importlib.util.module_from_spec(spec)
    theirs.__package__ = "gransearch"  # its relative imports resolve in this checkout's package
    spec.loader.exec_module(theirs)
    solvers = {"against": theirs.solve_knapsack, "this checkout": solve_knapsack}

    def one(solve):
        t0 = time.perf_counter()
        out = [solve(costs, losses, cap) for losses, cap in work]
        return 1e3 * (time.perf_counter() - t0) / len(work), out

    picks = {side: one(solve)[1] for side, solve in solvers.items()}
    ms: dict[str, list] = {side: [] for side in solvers}
    for _ in range(rounds):
        for side, solve in solvers.items():
            ms[side].append(one(solve)[0])
    return {**ms, "same": picks["against"] == picks["this checkout"], "random tables": same_on_random(solvers, random),
            "commits": {"against": commit(other), "this checkout": commit()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bank", default="runs/knapsack-bank", help="bank folder (built there once, reused after)")
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--tables", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--against", default=None, help="another checkout's root: its solver timed against this one's")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of both solvers (with --against)")
    ap.add_argument("--random", type=int, default=20000, help="random small tables both solvers answer (with --against)")
    ap.add_argument("--record", default=None)
    args = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    model, tok = gs.load_model("smollm2-135m")
    calib = gs.sample_windows(gs.load_tokens("wiki-sample", tok, "train"), args.n_calib, 512, seed=0)
    bits, grans = (3, 4, 8), ("channel", 32, 64)
    bank = bank_for(model, calib, args.bank, ("rtn", "gptq", "awq"), bits, grans, verbose=True)
    names = [r.name for r in model_linears(model)]
    costs, tables = cost_and_losses(bank)
    n_blocks = 1 + max(block_index(n) or 0 for n in names)
    kinds = sorted({layer_kind(n) for n in names})
    kind_of = np.array([kinds.index(layer_kind(n)) for n in names])
    quarter = np.array([depth_quarter(n, n_blocks) for n in names])
    caps = {}
    for spec in ("w3g64", "w4c", "w4g64"):
        budget = gs.QuantPlan.uniform(model, spec, "rtn").nbytes(model)
        caps[spec] = budget - check_budget(model, names, bits, grans, budget)[0]
    rng = np.random.default_rng(args.seed)
    rows, t_new, t_old, weighted = [], 0.0, 0.0, []
    for t in range(args.tables):
        table = list(tables)[t % len(tables)]
        spec = list(caps)[(t // len(tables)) % len(caps)]
        w = np.exp(rng.uniform(np.log(0.1), np.log(10), len(kinds)))[kind_of] * np.exp(rng.uniform(np.log(0.1), np.log(10), 4))[quarter]
        losses = tables[table] * w[:, None]
        weighted.append((losses, caps[spec]))
        t0 = time.perf_counter()
        new = solve_knapsack(costs, losses, caps[spec])
        t1 = time.perf_counter()
        old = _milp(costs, losses, [list(np.flatnonzero(np.isfinite(r))) for r in losses], caps[spec], rel_gap=1e-4)
        t2 = time.perf_counter()
        t_new, t_old = t_new + t1 - t0, t_old + t2 - t1
        for c in (new, old):
            assert sum(int(costs[i, j]) for i, j in enumerate(c)) <= caps[spec]
        rows.append({"table": table, "budget": spec, "new_ms": 1e3 * (t1 - t0), "highs_ms": 1e3 * (t2 - t1),
                     "new_loss": loss_of(losses, new), "highs_loss": loss_of(losses, old)})
    against = back_to_back(costs, weighted, args.against, args.rounds, args.random) if args.against else None
    n = len(rows)
    excess = [(r["highs_loss"] - r["new_loss"]) / abs(r["new_loss"]) for r in rows]
    print(f"\n## The search's knapsack: {n} tables of smollm2-135m's bank ({len(names)} layers, K = {costs.shape[1]}), one process")
    print(f"machine: {machine()}")
    print("| solver | mean ms per table | ratio | tables where its plan has the lower loss |\n|---|---:|---:|---:|")
    print(f"| HiGHS on the whole table, default gap 1e-4 (the former solver) | {1e3 * t_old / n:.1f} | 1.00 | "
          f"{sum(e < 0 for e in excess)} |")
    print(f"| solve_knapsack (dominance, reduced-cost fixing, exact DP) | {1e3 * t_new / n:.1f} | {t_new / t_old:.3f} | "
          f"{sum(e > 0 for e in excess)} (HiGHS' plan up to {max(excess):.1e} higher) |")
    if against is not None:
        print(f"\n## solve_knapsack on the same {n} tables back to back (as a search's trials), {args.rounds} alternating rounds")
        print("| solver | median ms per table (each round) | ratio |\n|---|---:|---:|")
        base = statistics.median(against["against"])
        for side in ("against", "this checkout"):
            each = ", ".join(f"{v:.1f}" for v in against[side])
            name = f"{args.against}'s" if side == "against" else "this checkout's"
            name += f" (commit {against['commits'][side]})"
            print(f"| {name} | {statistics.median(against[side]):.1f} ({each}) | {statistics.median(against[side]) / base:.2f} |")
        print(f"the same candidates on every table: {'yes' if against['same'] else 'NO'}")
        rnd = against["random tables"]
        print(f"the same answer on {rnd['same']} of {rnd['tables']} random small tables (ties, missing candidates, negative losses)")
    if args.record:
        os.makedirs(os.path.dirname(os.path.abspath(args.record)), exist_ok=True)
        with open(args.record, "w") as fh:
            json.dump({"machine": machine(), "args": vars(args), "rows": rows, "back_to_back": against}, fh, indent=1)
    if against is not None and not (against["same"] and against["random tables"]["same"] == args.random):
        raise SystemExit("the two solvers chose different candidates")


if __name__ == "__main__":
    main()
