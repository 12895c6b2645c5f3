"""The garbage collector's seconds in a search's long phases, with the heap frozen for each phase
(``gransearch._heap.frozen_heap``, the default) against without (``GRANSEARCH_GC_FREEZE=0``).

    python benchmarks/gc_pauses.py [--device cuda] [--n-calib 4] [--trials 30] [--eval-windows 2] [--record FILE]

Each mode runs in a fresh child process of its own, on SmolLM2-135M: one uniform GPTQ ``w4g64``
(``gs.quantize``, sequential), the bank of K = 12 of ``benchmarks/search_cost.py`` (rtn, gptq, awq x
3, 4 bits x per-channel, groups of 64), then ``optimize`` on that bank with the study in a SQLite
file (as the CLI keeps it), ``--trials`` trials of ``--eval-windows`` x 512 validation tokens. A
``gc.callbacks`` probe adds up, per phase, the collections and the seconds they took, and the full
(generation 2) ones apart. A full collection stops everything while it walks the tracked heap, so
its seconds add to the phase's wall time on any device; on a GPU, where a trial takes a fraction of
a second, they are a share of the trial loop that the CPU's 17-second trials hide. The calibration
is short by default (the bank's objects, not its arithmetic, are what the collector walks; 4
windows make the same 2,520 entries as 128), so the CPU run takes minutes.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PHASES = ("uniform GPTQ w4g64", "bank of K = 12", "trial loop")


class Probe:
    """The collector's work while open: collections and seconds, all and full ones apart."""

    def __init__(self):
        self.n, self.s, self.n_full, self.s_full, self._t0 = 0, 0.0, 0, 0.0, None

    def _callback(self, phase, info):
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            dt = time.perf_counter() - self._t0
            self.n, self.s = self.n + 1, self.s + dt
            if info["generation"] == 2:
                self.n_full, self.s_full = self.n_full + 1, self.s_full + dt
            self._t0 = None

    def __enter__(self):
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._callback)

    def __str__(self):
        return f"{self.s:.3f} s in {self.n} collections (full: {self.n_full}, {self.s_full:.3f} s)"


def child(args) -> dict:
    """One mode, in this process: the three phases, each probed."""
    import torch

    import gransearch as gs
    from gransearch.bank import build_bank

    from eval_speed import sync  # noqa: E402  (same folder)

    dev = args.device
    model, tok = gs.load_model("smollm2-135m")
    calib = gs.sample_windows(gs.load_tokens("wiki-sample", tok, "train"), args.n_calib, 512, seed=0)
    val = gs.load_tokens("wiki-sample", tok, "validation")
    out = {"tracked objects at start": len(gc.get_objects())}
    t0 = time.perf_counter()
    gc.collect()
    out["one full collection at start (s)"] = time.perf_counter() - t0

    def phase(name, fn):
        with Probe() as p:
            t0 = time.perf_counter()
            res = fn()
            sync(dev)
            wall = time.perf_counter() - t0
        out[name] = {"seconds": wall, "collections": p.n, "collector seconds": p.s, "full collections": p.n_full,
                     "full collection seconds": p.s_full}
        return res

    phase(PHASES[0], lambda: gs.quantize(copy.deepcopy(model), "w4g64", calib, method="gptq", objective=False, device=dev, verbose=False))
    bank = phase(PHASES[1], lambda: build_bank(model, calib, ("rtn", "gptq", "awq"), (3, 4), ("channel", 64), device=dev, verbose=False))
    budget = gs.QuantPlan.uniform(model, "w4c", "rtn").nbytes(model)
    with tempfile.TemporaryDirectory() as tmp:
        res = phase(PHASES[2], lambda: gs.optimize(
            model, budget_bytes=budget, calib=calib, eval_ids=val, methods=("rtn", "gptq", "awq"), bits=(3, 4),
            granularities=("channel", 64), n_trials=args.trials, eval_windows=args.eval_windows, n_final=0, bank=bank,
            device=dev, storage=f"sqlite:///{os.path.join(tmp, 'study.db')}", verbose=False))
    out[PHASES[2]]["trials"] = res.n_trials
    out["torch"] = torch.__version__
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cpu (default) or cuda")
    ap.add_argument("--n-calib", type=int, default=4)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--eval-windows", type=int, default=2)
    ap.add_argument("--record", default=None, help="write both modes' figures here (JSON)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one mode, print JSON
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, HERE)
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    sys.path.insert(0, HERE)
    from eval_speed import machine  # noqa: E402  (same folder)

    results = {}
    for mode, env in (("frozen (default)", "1"), ("not frozen (GRANSEARCH_GC_FREEZE=0)", "0")):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--n-calib", str(args.n_calib),
               "--trials", str(args.trials), "--eval-windows", str(args.eval_windows)] + (["--device", args.device] if args.device else [])
        run = subprocess.run(cmd, env={**os.environ, "GRANSEARCH_GC_FREEZE": env}, capture_output=True, text=True)
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if run.returncode or not lines:
            sys.exit(f"{mode}: the child failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
        results[mode] = json.loads(lines[-1][len("RESULT "):])
    frozen, plain = results.values()
    print(f"machine: {machine()}")
    print(f"\n## The garbage collector during a search's phases: SmolLM2-135M on {args.device or 'cpu'}, calibration "
          f"{args.n_calib} x 512, {args.trials} trials of {args.eval_windows} x 512 tokens, study in SQLite")
    print(f"tracked objects when the phases begin: {plain['tracked objects at start']:,}; one full collection of them: "
          f"{plain['one full collection at start (s)']:.3f} s")
    print("| phase | mode | seconds | collections | collector seconds | full collections | their seconds |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in PHASES:
        for mode, r in results.items():
            p = r[name]
            print(f"| {name} | {mode} | {p['seconds']:.1f} | {p['collections']} | {p['collector seconds']:.3f} | "
                  f"{p['full collections']} | {p['full collection seconds']:.3f} |")
    t = plain[PHASES[2]]["trials"]
    print(f"\ncollector seconds per trial: {plain[PHASES[2]]['collector seconds'] / t:.4f} not frozen, "
          f"{frozen[PHASES[2]]['collector seconds'] / t:.4f} frozen")
    if args.record:
        with open(args.record, "w") as f:
            json.dump({"machine": machine(), "device": args.device or "cpu", "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
