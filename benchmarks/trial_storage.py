"""What the study's storage adds to a trial: the trial loop with an evaluation that costs nothing,
the study in memory against the study in SQLite (as the CLI keeps it), with the sampler and the
pruner reading the study once per trial (``gransearch.study.PerTrialReads``, the default) or as
Optuna reads it (once per suggested weight and per pruning check).

    python benchmarks/trial_storage.py [--trials 60] [--repeats 2] [--record FILE]

The model is a random Llama with SmolLM2-135M's layout (30 blocks: 210 linears, so each trial
stores a plan of 210 entries, and samples the same 12 knapsack weights) and tiny widths; its bank is
RTN at 3, 4 and 8 bits, per channel and in groups of 32 and 64 (the README's grid). The evaluation
is a plan-dependent number (the squared distance of the assembled weights from the float ones)
reported 4 times, as the README's 16 validation windows in batches of 4 report, so the pruner acts.
Everything here runs on the host, on any machine: on a GPU, where an evaluation of SmolLM2 takes
about 0.125 s, this is the part of a trial that the device cannot make faster. All searches run in
one process on one bank, alternating, ``--repeats`` times each; they must produce the same trials
(states, weights, values), which the script checks.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import gransearch as gs  # noqa: E402
from gransearch.arch import linear_weight, model_linears  # noqa: E402
from gransearch.study import PerTrialReads  # noqa: E402

from eval_speed import machine  # noqa: E402  (same folder)

MODES = ("memory", "sqlite, Optuna's reads", "sqlite, one read per trial")


def smollm2_layout():
    """A random Llama with SmolLM2-135M's 30 blocks and 7 linears a block, at tiny widths."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=30, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def objective(reference):
    """Squared distance of the assembled weights from ``reference``'s, reported after each quarter."""
    ref = [(r.name, linear_weight(r.module).detach().clone()) for r in model_linears(reference)]

    def fn(model, report):
        mods = dict(model.named_modules())
        total, quarter = 0.0, (len(ref) + 3) // 4
        for i, (name, w) in enumerate(ref):
            total += float(((linear_weight(mods[name]).detach() - w) ** 2).sum())
            if (i + 1) % quarter == 0 or i + 1 == len(ref):
                report(4 * (i + 1) // len(ref) * 4, total)  # steps 4, 8, 12, 16: the windows done
        return total

    return fn


class Statements:
    """SQL statements sent while open, by their first word (SQLAlchemy's engine events)."""

    def __init__(self):
        self.counts = collections.Counter()

    def _count(self, conn, cursor, statement, *args):
        self.counts[statement.split(None, 1)[0].upper()] += 1

    def _commit(self, conn):
        self.counts["COMMIT"] += 1

    def __enter__(self):
        import sqlalchemy

        sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", self._count)
        sqlalchemy.event.listen(sqlalchemy.engine.Engine, "commit", self._commit)
        return self

    def __exit__(self, *exc):
        import sqlalchemy

        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", self._count)
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "commit", self._commit)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=60, help="trials per search (the README's search runs 60)")
    ap.add_argument("--repeats", type=int, default=2, help="searches per mode, alternating")
    ap.add_argument("--record", default=None, help="write the figures here (JSON)")
    args = ap.parse_args()

    model = smollm2_layout()
    calib = gs.sample_windows(torch.randint(0, 128, (4096,), generator=torch.Generator().manual_seed(1)), 4, 64, seed=0)
    names = [r.name for r in model_linears(model)]
    lo = gs.plan.plan_nbytes(model, {n: gs.plan.LayerPlan("rtn", gs.QuantSpec.parse("w3c")) for n in names})
    hi = gs.plan.plan_nbytes(model, {n: gs.plan.LayerPlan("rtn", gs.QuantSpec.parse("w8g32")) for n in names})
    work = tempfile.mkdtemp(prefix="trial-storage-")
    kw = dict(budget_bytes=(lo + hi) // 2, calib=calib, eval_ids=None, methods=("rtn",), bits=(3, 4, 8),
              granularities=("channel", 32, 64), n_trials=args.trials, seed=0, objective_fn=objective(model), n_final=0,
              verbose=False, seqlen=64, bank_dir=os.path.join(work, "bank"))
    t0 = time.perf_counter()
    gs.optimize(model, **{**kw, "n_trials": 1})  # builds and stores the bank, outside the timings
    print(f"bank: {len(names)} layers, built in {time.perf_counter() - t0:.1f} s")

    runs = {m: [] for m in MODES}
    trials = {}
    for rep in range(args.repeats):
        for mode in MODES:
            PerTrialReads.ENABLED = mode != MODES[1]
            storage = None if mode == "memory" else f"sqlite:///{work}/{rep}-{MODES.index(mode)}.db"
            with Statements() as sql:
                res = gs.optimize(model, storage=storage, study_name="s", **kw)
            PerTrialReads.ENABLED = True
            n = len(res.study.trials)
            runs[mode].append({"seconds per trial": res.search_seconds / n,
                               "stages per trial": {k: v / n for k, v in res.trial_stages.items()},
                               "statements per trial": {k: v / n for k, v in sorted(sql.counts.items())}})
            trials.setdefault(mode, [(t.state.name, t.params, t.value) for t in res.study.trials])
    same = all(t == trials[MODES[0]] for t in trials.values())
    pruned = sum(s == "PRUNED" for s, _, _ in trials[MODES[0]])

    def mean(mode, key="seconds per trial"):
        return sum(r[key] for r in runs[mode]) / len(runs[mode])

    print(f"machine: {machine()}")
    print(f"\n## The trial loop's host cost: {args.trials} trials on a {len(names)}-layer plan (SmolLM2-135M's layout), "
          f"evaluation free, {args.repeats} searches per mode alternating; {pruned} of {args.trials} trials pruned")
    print("| study | seconds per trial (each search) | mean | over the study in memory | SQL statements per trial |")
    print("|---|---|---:|---:|---:|")
    base = mean(MODES[0])
    for mode in MODES:
        each = ", ".join(f"{r['seconds per trial']:.4f}" for r in runs[mode])
        stmts = sum(runs[mode][0]["statements per trial"].values()) - runs[mode][0]["statements per trial"].get("COMMIT", 0)
        print(f"| {mode} | {each} | {mean(mode):.4f} | +{mean(mode) - base:.4f} | {stmts:.1f} |")
    old, new = mean(MODES[1]) - base, mean(MODES[2]) - base
    print(f"\nwhat SQLite adds to a trial: {new:.4f} s with one read per trial against {old:.4f} s with Optuna's reads "
          f"({new / old:.2f}x)")
    print(f"same trials in every search (states, weights, values): {'yes' if same else 'NO'}")
    for mode in MODES:
        st = runs[mode][0]["stages per trial"]
        print(f"stages per trial, {mode}: " + ", ".join(f"{k} {v:.4f}" for k, v in st.items()))
        print(f"statements per trial, {mode}: " + ", ".join(f"{k} {v:.1f}" for k, v in runs[mode][0]["statements per trial"].items()))
    if args.record:
        with open(args.record, "w") as f:
            json.dump({"machine": machine(), "args": vars(args), "same trials": same, "pruned": pruned, "runs": runs}, f, indent=1)
    if not same:
        sys.exit("the searches differ: reading the study once per trial changed what was sampled or pruned")


if __name__ == "__main__":
    main()
