"""Seconds of one block's AWQ searches (scale grid and clip ratios), this checkout against another.

    python benchmarks/awq_speed.py [--device cuda] [--against DIR] [--rounds 3] [--record FILE]

The work of ``benchmarks/launches.py``: the bank's AWQ searches of one block of SmolLM2-135M's
shapes (random weights, Hessians of random inputs with outlier channels), every spec of the README
search (3, 4, 8 bits x per-channel, groups of 32 and 64), 20 grid points and 10 clip ratios, in the
two forms the bank runs: the loop (what the CPU's bank runs) and stacked (what a GPU's bank runs).
Here the inputs and the Hessians' rank-64 factors are made before the clock starts, so the seconds
are the searches' alone.

``--against DIR`` (a ``git worktree add DIR COMMIT``): the same timing with the gransearch of
``DIR``, each side in its own process, ``--rounds`` times alternately (the best of each side's runs
is kept, so that a slow moment of the machine falls on both); the scales and clip ratios both
choose must be the same.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SPECS = ("w3c", "w3g32", "w3g64", "w4c", "w4g32", "w4g64", "w8c", "w8g32", "w8g64")
FORMS = {"loop (the CPU's bank)": False, "stacked (a GPU's bank)": True}


def measure(dev: str, repeats: int) -> dict:
    """Best seconds of each form over ``repeats`` runs, and a digest of the choices (gransearch as imported)."""
    import gransearch as gs

    sys.path.insert(0, HERE)
    from eval_speed import sync  # noqa: E402  (same folder)
    from launches import prepare, searches  # noqa: E402

    specs = [gs.QuantSpec.parse(s) for s in SPECS]
    prepared = prepare(dev)  # inputs, Hessians and their factors, before the clock starts

    rows, digest = {}, hashlib.sha256()
    for name, batch in FORMS.items():
        for t in searches(prepared, specs, batch):  # once untimed: the choices, and the first use of each kernel
            digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        best = float("inf")
        for _ in range(repeats):
            sync(dev)
            t0 = time.perf_counter()
            searches(prepared, specs, batch)
            sync(dev)
            best = min(best, time.perf_counter() - t0)
        rows[name] = best
    return {"seconds": rows, "choices": digest.hexdigest()[:16]}


def child(root: str, dev: str, repeats: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, __file__, "--json", "--device", dev, "--repeats", str(repeats)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--against", default=None, help="another checkout's root")
    ap.add_argument("--rounds", type=int, default=3, help="alternate runs of each side (with --against)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each form in one process")
    ap.add_argument("--record", default=None)
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # a child's output
    args = ap.parse_args()
    if args.json:
        print(json.dumps(measure(args.device, args.repeats)))
        return
    root = os.path.dirname(HERE)
    sides = {"this checkout": root} | ({args.against: args.against} if args.against else {})
    runs: dict[str, list] = {k: [] for k in sides}
    for _ in range(args.rounds if args.against else 1):
        for k, r in sides.items():
            runs[k].append(child(r, args.device, args.repeats))
    best = {k: {f: min(run["seconds"][f] for run in v) for f in FORMS} for k, v in runs.items()}
    choices = {k: {run["choices"] for run in v} for k, v in runs.items()}
    sys.path.insert(0, HERE)
    from eval_speed import machine  # noqa: E402

    print(f"## One block's AWQ searches (SmolLM2-135M shapes, {len(SPECS)} specs: scale grid of 20, 10 clip ratios) on {args.device}, "
          f"best of {args.repeats} runs x {len(runs['this checkout'])} processes per side")
    print(f"machine: {machine()}")
    head = "| form | this checkout (s) |" + (f" {args.against} (s) | ratio |" if args.against else "")
    print(head + "\n|---|---:|" + ("---:|---:|" if args.against else ""))
    for f in FORMS:
        line = f"| {f} | {best['this checkout'][f]:.3f} |"
        if args.against:
            line += f" {best[args.against][f]:.3f} | {best['this checkout'][f] / best[args.against][f]:.2f} |"
        print(line)
    same = len(set().union(*choices.values())) == 1
    print(f"\nthe same scales and clip ratios in every run{' on both sides' if args.against else ''}: {same}")
    if args.record:
        os.makedirs(os.path.dirname(os.path.abspath(args.record)), exist_ok=True)
        with open(args.record, "w") as fh:
            json.dump({"machine": machine(), "device": args.device, "against": args.against, "seconds": best, "runs": runs,
                       "same_choices": same}, fh, indent=1)
    if not same:
        raise SystemExit("the two sides chose different scales or clip ratios")


if __name__ == "__main__":
    main()
