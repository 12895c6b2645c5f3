"""Kernel launches of one block's AWQ searches in the bank: the grid in a loop against stacked.

    python benchmarks/launches.py [--device cuda] [--record FILE]

On a GPU every tensor operation that is not a view launches at least one kernel, and a search made
of many small operations waits on launches, not on arithmetic (the H100 bank of 2026-11-27 spent
15.8 of its 33.4 s in AWQ's scale search and 3.9 s in its clip search). This counts those
operations with a dispatch mode, which needs no GPU, and times both forms on ``--device`` (CPU
by default; there the loop is what the bank runs, as its pinned codes were made with it), in the
same process.

Work: the bank's AWQ searches of one block of SmolLM2-135M's shapes (hidden 576, 3 KV heads of 64,
MLP 1536; random weights, a Hessian of random inputs with outlier channels, its rank-64 factor as
the bank uses): the scale search of each scaling group (q/k/v; gate/up; down) and the clip search
of each layer that clips after AWQ (all but q and k), for every spec of the README search (3, 4, 8
bits x per-channel, groups of 32 and 64), 20 grid points and 10 clip ratios. Both forms must choose
the same scales and ratios: the script checks it.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gransearch as gs
from gransearch.algorithms.awq import awq_grid_scales, awq_search_hessian, clip_ratios_hessian, hessian_factor
from gransearch.arch import clips_after_awq

from eval_speed import machine, sync  # noqa: E402  (same folder)

GROUPS = {"q/k/v": (("q_proj", 576), ("k_proj", 192), ("v_proj", 192)), "gate/up": (("gate_proj", 1536), ("up_proj", 1536)),
          "down": (("down_proj", 576),)}
IN_FEATURES = {"q/k/v": 576, "gate/up": 576, "down": 1536}


class Launches(TorchDispatchMode):
    """Counts the aten operations that are not views (each launches at least one GPU kernel)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.n += 1
        return func(*args, **(kwargs or {}))


def inputs(d: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(d)
    x = torch.randn(2048, d, generator=g) @ (torch.eye(d) + 0.1 * torch.randn(d, d, generator=g))
    x[:, :: max(1, d // 8)] *= 20.0
    return x.abs().mean(0).to(dev), (2.0 / x.shape[0] * x.t() @ x).to(dev)


def prepare(dev) -> list:
    """One block's inputs for its AWQ searches, per scaling group: its layers, mean ``|x|``, Hessian,
    the Hessian's rank-64 factor (as the bank uses) and the group's weights."""
    out = []
    g = torch.Generator().manual_seed(0)
    for grp, layers in GROUPS.items():
        act, H = inputs(IN_FEATURES[grp], dev)
        F = hessian_factor(H, 64)
        ws = [(torch.randn(o, IN_FEATURES[grp], generator=g) * 0.05).to(dev) for _, o in layers]
        out.append((layers, act, H, F, ws))
    return out


def searches(prepared: list, specs, batch: bool, share: bool = True) -> list:
    """Every AWQ search of one block (``prepare``'s inputs), as the bank runs them (``share``: the
    grid's scales computed once per group, not once per spec); their results, to compare."""
    out = []
    for layers, act, H, F, ws in prepared:
        grid = awq_grid_scales(act, 20) if share else None
        for spec in specs:
            res = awq_search_hessian(act, ws, H, spec, factor=F, batch=batch, grid=grid)
            out.append(res.scales)
            s = res.scales
            for (name, _), w in zip(layers, ws):
                if clips_after_awq(name):
                    out.append(clip_ratios_hessian(w * s, H / s[None] / s[:, None], spec, factor=F / s[:, None], batch=batch))
    return out


def block_searches(batch: bool, share: bool, dev, specs) -> list:
    """:func:`searches` with its inputs made on the way (timed with them)."""
    return searches(prepare(dev), specs, batch, share)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--record", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    specs = [gs.QuantSpec.parse(s) for s in ("w3c", "w3g32", "w3g64", "w4c", "w4g32", "w4g64", "w8c", "w8g32", "w8g64")]
    rows = {}
    results = {}
    forms = {"loop, grid scales per spec (the bank measured on the H100)": (False, False),
             "loop, grid scales per group (the CPU's bank now)": (False, True), "stacked (the GPU's bank now)": (True, True)}
    for name, (batch, share) in forms.items():
        with Launches() as count:
            results[name] = block_searches(batch, share, dev, specs)
        best = float("inf")
        for _ in range(args.repeats):
            sync(dev)
            t0 = time.perf_counter()
            block_searches(batch, share, dev, specs)
            sync(dev)
            best = min(best, time.perf_counter() - t0)
        rows[name] = {"launches": count.n, "seconds": best}
    first, *others = results.values()
    same = all(torch.equal(a, b) for r in others for a, b in zip(first, r))
    base = rows[next(iter(rows))]
    print(f"## AWQ's scale and clip searches of one SmolLM2-135M-shaped block, 9 specs, on {dev}")
    print(f"machine: {machine()}")
    print("| grid | operations (GPU launches, at least) | ratio | seconds | ratio |\n|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['launches']:,} | {r['launches'] / base['launches']:.3f} | {r['seconds']:.3f} | "
              f"{r['seconds'] / base['seconds']:.2f} |")
    print(f"\nsame scales and clip ratios: {same}")
    if args.record:
        os.makedirs(os.path.dirname(os.path.abspath(args.record)), exist_ok=True)
        with open(args.record, "w") as fh:
            json.dump({"machine": machine(), "device": str(dev), "rows": rows, "same_choices": same}, fh, indent=1)
    if not same:
        raise SystemExit("the forms chose different scales or clip ratios")


if __name__ == "__main__":
    main()
