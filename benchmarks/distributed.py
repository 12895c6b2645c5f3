"""One search run by one process against the same search run by several worker processes sharing its
study and its bank folder, on the packaged SmolLM2 (CPU).

    python benchmarks/distributed.py --out runs/distributed [--workers 2] [--trials 20]
    python benchmarks/distributed.py --out runs/distributed --storage postgresql+psycopg2://USER@HOST/DB

Each configuration is the real command line: ``gransearch optimize`` (which creates the study and
stores its run configuration), then ``gransearch worker`` for every further process once the study
exists. The single process uses every core; with W workers each process gets ``cores / W``
threads (``OMP_NUM_THREADS``), so both configurations use the same machine. Reported per
configuration: wall time, the bank's wall time (the first trial's start) and the sum of its blocks'
compute seconds, the trial phase's wall time per trial (the throughput, the figure that must not
get worse), the median single-trial duration, which worker built which blocks and ran which
trials, and the invariants (exactly ``--trials`` counted trials, no plan measured twice, every
plan within the budget). Results go to ``OUT/results.json``. The candidate set is small (RTN and
GPTQ, 3, 4 and 8 bits, groups of 64 and 128: 12 per layer) to keep the run to minutes on 2 cores; pass
``--methods/--bits/--grans`` for more.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time


def _study(storage: str, name: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=storage)


def _wait_for_study(storage: str, name: str, proc, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"gransearch optimize exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        try:
            if _study(storage, name).user_attrs.get("cli_config"):
                return
        except Exception:  # not created yet
            pass
        time.sleep(1.0)
    raise SystemExit("the study did not appear in time")


def run_config(args, workers: int) -> dict:
    out = os.path.abspath(os.path.join(args.out, f"workers-{workers}"))
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    name = f"gransearch-workers-{workers}-{int(time.time())}"
    storage = args.storage or f"sqlite:///{out}/study.db"
    threads = max(1, (os.cpu_count() or 1) // workers)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    common = ["--quiet"]
    cmd = [sys.executable, "-m", "gransearch.cli", "optimize", "--model", args.model, "--methods", args.methods, "--bits", args.bits,
           "--grans", args.grans, "--budget-like", args.budget_like, "--trials", str(args.trials), "--n-final", "0", "--n-calib",
           str(args.n_calib), "--out", out, "--study", name, "--storage", storage, "--device", "cpu"] + common
    t0 = time.time()
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    if workers > 1:
        _wait_for_study(storage, name, procs[0])
        wcmd = [sys.executable, "-m", "gransearch.cli", "worker", "--storage", storage, "--study", name, "--trials", str(args.trials)] + common
        procs += [subprocess.Popen(wcmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(workers - 1)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"a process failed ({p.returncode}): {err[-3000:]}")
    wall = time.time() - t0

    import optuna

    S = optuna.trial.TrialState
    trials = _study(storage, name).get_trials(deepcopy=False)
    counted = [t for t in trials if t.state in (S.COMPLETE, S.PRUNED)]
    first = min(t.datetime_start for t in trials if t.datetime_start).timestamp()
    last = max(t.datetime_complete for t in counted).timestamp()
    measured = [t.user_attrs["plan_id"] for t in trials if t.state == S.COMPLETE and "duplicate_of" not in t.user_attrs]
    summary = json.load(open(os.path.join(out, "summary.json")))
    bank_dir = os.path.join(out, "bank")
    blocks = [json.load(open(os.path.join(bank_dir, f))) for f in sorted(os.listdir(bank_dir)) if f.startswith("block") and f.endswith(".json")]
    by_worker: dict = {}
    for b in blocks:
        by_worker.setdefault(b["worker"], {"blocks": 0, "trials": 0})["blocks"] += 1
    for t in counted:
        by_worker.setdefault(t.user_attrs.get("worker", "?"), {"blocks": 0, "trials": 0})["trials"] += 1
    return {
        "workers": workers, "threads_per_process": threads, "wall_seconds": wall,
        "bank_wall_seconds": first - t0, "bank_block_seconds": sum(b["seconds"] for b in blocks),
        "trial_phase_seconds": last - first, "seconds_per_trial": (last - first) / len(counted),
        "median_trial_seconds": statistics.median((t.datetime_complete - t.datetime_start).total_seconds() for t in counted),
        "counted_trials": len(counted), "failed_trials": sum(t.state == S.FAIL for t in trials),
        "duplicates_answered": sum("duplicate_of" in t.user_attrs for t in trials),
        "no_plan_measured_twice": len(measured) == len(set(measured)),
        "all_within_budget": all(t.user_attrs["nbytes"] <= summary["budget_bytes"] for t in counted),
        "best_proxy_ppl": summary["proxy_ppl"], "by_worker": by_worker,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/distributed")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--bits", default="3,4,8")
    ap.add_argument("--grans", default="64,128")
    ap.add_argument("--budget-like", default="w4g64")
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--storage", default=None, help="a database URL shared by the workers (default: SQLite in each run folder)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import torch

    rows = {"machine": f"{os.cpu_count()} cores, torch {torch.__version__}", "model": args.model, "trials": args.trials,
            "candidates": {"methods": args.methods, "bits": args.bits, "grans": args.grans, "budget_like": args.budget_like}}
    for w in (1, args.workers):
        rows[f"workers-{w}"] = r = run_config(args, w)
        print(json.dumps(r), flush=True)
    one, many = rows["workers-1"], rows[f"workers-{args.workers}"]
    rows["ratios"] = {"wall": many["wall_seconds"] / one["wall_seconds"], "bank_wall": many["bank_wall_seconds"] / one["bank_wall_seconds"],
                      "seconds_per_trial": many["seconds_per_trial"] / one["seconds_per_trial"]}
    print(json.dumps(rows["ratios"]))
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
