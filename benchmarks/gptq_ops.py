"""Operations in GPTQ's column loop (each one kernel on a GPU, where the loop is bound by them).

    python benchmarks/gptq_ops.py [--against DIR]

Counts the aten operations that are not views (:class:`launches.Launches`, a dispatch mode: no GPU
needed) in one ``gs.gptq`` solve of each shape of a SmolLM2-135M block as ``gs.quantize`` solves them
on a GPU (q/k/v stacked: 960 x 576; o: 576 x 576; gate/up stacked: 3072 x 576; down: 576 x 1536;
random weights, a Hessian of random inputs) for w4g64, w4c and w4g64s, and prints operations per
solve and per input column, as the CPU runs the loop and as a GPU does (multiply-adds,
``FUSED_MULTIPLY_ADDS``), with the number of the GPU form's codes that differ from the CPU form's. ``--against DIR``: the same count with the gransearch of another
checkout (say ``git worktree add /tmp/before COMMIT``), in a child process, and whether both give
the same codes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = {"q/k/v": (960, 576), "o": (576, 576), "gate/up": (3072, 576), "down": (576, 1536)}
SPECS = ("w4g64", "w4c", "w4g64s")


def count(root: str) -> dict:
    """Operations per solve and a digest of the codes, with the gransearch found in ``root``."""
    sys.path.insert(0, root)
    import gransearch as gs

    from launches import Launches  # noqa: E402  (same folder)

    import importlib

    mod = importlib.import_module("gransearch.algorithms.gptq")
    forms = {"": None} if not hasattr(mod, "FUSED_MULTIPLY_ADDS") else {"": False, "gpu ": True}
    out = {}
    for name, (rows, cols) in SHAPES.items():
        g = torch.Generator().manual_seed(cols)
        x = torch.randn(2 * cols, cols, generator=g)
        H = 2 * x.T @ x / x.shape[0]
        W = torch.randn(rows, cols, generator=g) * 0.05
        for spec in SPECS:
            row, got = {"columns": cols}, {}
            for form, fused in forms.items():
                if fused is not None:
                    mod.FUSED_MULTIPLY_ADDS = fused
                with Launches() as n:
                    r = gs.gptq(W.clone(), H, gs.QuantSpec.parse(spec))
                row[form + "ops"] = n.n
                row[form + "codes"] = hashlib.sha256(r.qweight.codes.contiguous().numpy().tobytes()).hexdigest()[:16]
                got[form] = r.qweight.codes
            if len(got) > 1:  # how many of the GPU form's codes differ from the CPU form's
                row["gpu differ"] = int((got["gpu "] != got[""]).sum())
                row["n codes"] = got[""].numel()
            out[f"{name} {spec}"] = row
    if hasattr(mod, "FUSED_MULTIPLY_ADDS"):
        mod.FUSED_MULTIPLY_ADDS = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", default=None, help="another checkout's root, counted in a child process")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # the child's output
    args = ap.parse_args()
    root = os.path.dirname(HERE)
    if args.json:
        print(json.dumps(count(os.environ["GPTQ_OPS_ROOT"])))
        return
    now = count(root)
    before = None
    if args.against:
        env = dict(os.environ, GPTQ_OPS_ROOT=os.path.abspath(args.against))
        done = subprocess.run([sys.executable, __file__, "--json"], env=env, capture_output=True, text=True, check=True)
        before = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"## GPTQ column loop: operations per solve (each a kernel on a GPU), torch {torch.__version__}")
    head = "| solve | columns | operations | per column | as a GPU runs it (multiply-adds): operations | per column | codes not the CPU's |"
    if before:
        head += f" {args.against}: operations | per column | ratio | same codes |"
    print(head + "\n|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|---|" if before else ""))
    tot = [0, 0, 0, 0]
    for k, r in now.items():
        line = (f"| {k} | {r['columns']} | {r['ops']:,} | {r['ops'] / r['columns']:.2f} | {r['gpu ops']:,} | "
                f"{r['gpu ops'] / r['columns']:.2f} | {r['gpu differ']:,} of {r['n codes']:,} |")
        tot[0] += r["columns"]
        tot[1] += r["ops"]
        tot[3] += r["gpu ops"]
        if before:
            b = before[k]
            tot[2] += b["ops"]
            line += f" {b['ops']:,} | {b['ops'] / b['columns']:.2f} | {r['ops'] / b['ops']:.3f} | {b['codes'] == r['codes']} |"
        print(line)
    last = f"| all | {tot[0]} | {tot[1]:,} | {tot[1] / tot[0]:.2f} | {tot[3]:,} | {tot[3] / tot[0]:.2f} | |"
    if before:
        last += f" {tot[2]:,} | {tot[2] / tot[0]:.2f} | {tot[1] / tot[2]:.3f} | |"
    print(last)


if __name__ == "__main__":
    main()
