"""Operations of the candidate bank, stage by stage (each one kernel on a GPU, where the bank waits on them).

    python benchmarks/bank_ops.py [--blocks 2] [--against DIR] [--as cpu] [--no-act-order]

The bank of ``benchmarks/search_cost.py`` (K = 12: rtn, gptq, awq x 3, 4 bits x per-channel, groups
of 64, 128 calibration windows of 512 tokens) built on the CPU for the first ``--blocks`` decoder
blocks of SmolLM2-135M the way a GPU builds it: q/k/v and gate/up stacked (one GPTQ solve, their
objectives together), AWQ's grid points and clip ratios stacked, and the output Fisher's windows
batched as on a GPU (``FISHER_GPU_TOKENS``; a checkout without it ran 2 windows a pass there), and
GPTQ's column loop with a GPU's multiply-adds (``FUSED_MULTIPLY_ADDS``, where the checkout has it). A
dispatch mode counts, per bank stage (the ``gransearch: <stage>`` profiler ranges of
:class:`gransearch.bank.Stages`), the aten operations that are not views (on a GPU each launches at
least one kernel), the scalar reads (``.item()``, ``float()``: on a GPU each waits for the queue
behind it) and the operations' memory traffic (the bytes of their tensor arguments and results,
each once: what a memory-bound kernel moves at least). No GPU is needed. Caveats: on a GPU, GPTQ's column loop is replayed from CUDA graphs,
so its operations there are graph nodes, not launches; ``.tolist()`` and copies to the host are no
dispatched operations, so the one transfer per group of layers that settles the bank's entries (and
one per AWQ search, which reads its losses) is not in the count.

``--against DIR``: the same count with the gransearch of another checkout (``git worktree add DIR
COMMIT``), in a child process, and whether both banks hold the same codes, the same keys and the
same objectives (to a relative 1e-5: a stacked product may round differently in the last bits);
where this checkout's GPTQ has the GPU's multiply-adds and the other's has not, GPTQ's entries may
differ (how many is printed; their objectives to a relative 1e-3) and no other entry may.
``--as cpu``: the bank as the CPU builds it (nothing forced); against another checkout its codes,
objectives (per row too) and output Fisher must then be equal bit for bit. ``--no-act-order``: the
bank's GPTQ in natural column order (its groups taken inside the column loop) instead of the default
act-order with static groups.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import json
import os
import subprocess
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = os.path.dirname(os.path.abspath(__file__))
STAGE = "gransearch: "  # the profiler ranges of gransearch.bank


class StageOps(TorchDispatchMode):
    """Counts operations (not views) and scalar reads under the innermost open ``gransearch: ``
    profiler range (the bank's stages, its blocks, and the host-side part of settling entries), which
    the dispatcher shows as operations of the ``profiler`` namespace."""

    OUTSIDE = "outside the bank's blocks"

    def __init__(self):
        super().__init__()
        self.stack: list = []  # (handle, range name)
        self.ops: dict[str, int] = {}
        self.reads: dict[str, int] = {}
        self.bytes: dict[str, int] = {}

    def where(self) -> str:
        names = [n for _, n in self.stack if n is not None]
        return names[-1] if names else self.OUTSIDE

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "profiler":
            if "enter" in func.__name__:
                name = args[0] if args and isinstance(args[0], str) else ""
                self.stack.append((out, name[len(STAGE):] if name.startswith(STAGE) else None))
            elif "exit" in func.__name__ and self.stack:
                self.stack.pop()
            return out
        where = self.where()
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads[where] = self.reads.get(where, 0) + 1
        elif not func.is_view:
            self.ops[where] = self.ops.get(where, 0) + 1
            self.bytes[where] = self.bytes.get(where, 0) + (0 if func in NO_DATA else _traffic(args, kwargs, out))
        return out


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


def _traffic(args, kwargs, out) -> int:
    """An operation's memory traffic, estimated: the bytes of its tensor arguments (read) and results
    (written), each once (a broadcast argument at its own size; an in-place result counted as read and
    written). What a memory-bound kernel moves at least; a matrix product that rereads its operands
    moves more."""
    return sum(t.numel() * t.element_size() for t in _tensors((args, kwargs or {}, out)))


NO_DATA = {torch.ops.aten._unsafe_view.default}  # a view the dispatcher does not mark as one: it moves nothing


def count(root: str, n_blocks: int, as_gpu: bool = True, act_order: bool = True) -> dict:
    """Operations and scalar reads per stage, and digests of the bank, with the gransearch in ``root``
    (``as_gpu=False``: the bank as the CPU builds it, nothing forced; ``act_order``: GPTQ's column order)."""
    sys.path.insert(0, root)
    sys.path.insert(1, HERE)
    import gransearch as gs
    from gransearch import bank as bank_mod
    from gransearch import sensitivity
    from search_cost import first_blocks  # noqa: E402  (same folder)

    model, tok = gs.load_model("smollm2-135m")
    calib = gs.sample_windows(gs.load_tokens("wiki-sample", tok, "train"), 128, 512, seed=0)
    small = first_blocks(model, n_blocks)
    mode = StageOps()
    scale_search = "awq_search_hessian_specs" if hasattr(bank_mod, "awq_search_hessian_specs") else "awq_search_hessian"  # older checkouts: one spec a call
    searches = getattr(bank_mod, scale_search), bank_mod.clip_ratios_hessian, bank_mod.output_fisher
    bank_mod.STACK_SHARED_INPUTS = True  # as on a GPU: q/k/v and gate/up in one GPTQ solve, objectives stacked,
    setattr(bank_mod, scale_search, functools.partial(searches[0], batch=True))  # AWQ's grid and clip ratios stacked,
    bank_mod.clip_ratios_hessian = functools.partial(searches[1], batch=True)
    tokens = getattr(sensitivity, "FISHER_GPU_TOKENS", None)  # the Fisher's windows per pass on a GPU
    bank_mod.output_fisher = functools.partial(searches[2], batch_size=max(2, tokens // calib.shape[1]) if tokens else 2)
    gptq_mod = importlib.import_module("gransearch.algorithms.gptq")
    fused = hasattr(gptq_mod, "FUSED_MULTIPLY_ADDS")  # GPTQ's column loop with a GPU's multiply-adds
    if fused:
        gptq_mod.FUSED_MULTIPLY_ADDS = True
    if not as_gpu:
        bank_mod.STACK_SHARED_INPUTS = None
        setattr(bank_mod, scale_search, searches[0])
        bank_mod.clip_ratios_hessian, bank_mod.output_fisher = searches[1:]
        if fused:
            gptq_mod.FUSED_MULTIPLY_ADDS = None
    try:
        with mode:
            bank = bank_mod.build_bank(small, calib, ("rtn", "gptq", "awq"), (3, 4), ("channel", 64), verbose=False, act_order=act_order)
    finally:
        if fused:
            gptq_mod.FUSED_MULTIPLY_ADDS = None
        bank_mod.STACK_SHARED_INPUTS = None
        setattr(bank_mod, scale_search, searches[0])
        bank_mod.clip_ratios_hessian, bank_mod.output_fisher = searches[1:]
    codes = hashlib.sha256()
    entries = {}  # "layer key" -> digest of that entry's codes, scales, zeros and AWQ scales
    for name, keys, row in zip(bank.layers, bank.keys, bank.entries):
        for key, e in zip(keys, row):
            q = e.quantized()
            one = hashlib.sha256()
            for t in (q.codes, q.scale, q.zero, e.in_scale):
                if t is not None:
                    b = t.contiguous().view(torch.uint8).numpy().tobytes()
                    codes.update(b)
                    one.update(b)
            entries[f"{name} {key}"] = one.hexdigest()[:16]
    rows = hashlib.sha256()  # the per-row objectives
    for row in bank.entries:
        for e in row:
            rows.update(e.row_objective.contiguous().view(torch.uint8).numpy().tobytes())
    fisher = hashlib.sha256(b"".join(bank.fisher[k].contiguous().view(torch.uint8).numpy().tobytes() for k in sorted(bank.fisher)))
    return {"ops": mode.ops, "reads": mode.reads, "bytes": mode.bytes, "codes": codes.hexdigest()[:16], "fisher": fisher.hexdigest()[:16], "rows": rows.hexdigest()[:16],
            "keys": bank.keys, "entries": entries, "fused": fused and as_gpu,
            "objectives": [[e.objective for e in row] for row in bank.entries]}


def _order(stages) -> list[str]:
    first = ["statistics", "awq hessian factors", "awq scale search", "awq clip search", "gptq", "objectives and copies", "on the host",
             "blocks", "output fisher"]
    return [s for s in first if s in stages] + sorted(s for s in stages if s not in first)


LABELS = {"blocks": "in the blocks, outside their stages (RTN and AWQ roundings)",
          "on the host": "on the host, settling entries (CPU memory: no GPU kernels on a GPU)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--against", default=None, help="another checkout's root, counted in a child process")
    ap.add_argument("--as", dest="as_", choices=("gpu", "cpu"), default="gpu",
                    help="gpu (default): the bank as a GPU builds it; cpu: as the CPU does, whose banks must then be equal bit for bit")
    ap.add_argument("--no-act-order", dest="act_order", action="store_false", help="GPTQ in natural column order (default: act-order)")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # the child's output
    args = ap.parse_args()
    root = os.path.dirname(HERE)
    if args.json:
        print(json.dumps(count(os.environ["BANK_OPS_ROOT"], args.blocks, args.as_ == "gpu", args.act_order)))
        return
    now = count(root, args.blocks, args.as_ == "gpu", args.act_order)
    before = None
    if args.against:
        env = dict(os.environ, BANK_OPS_ROOT=os.path.abspath(args.against))
        done = subprocess.run([sys.executable, __file__, "--json", "--blocks", str(args.blocks), "--as", args.as_] + ([] if args.act_order else ["--no-act-order"]), env=env,
                              capture_output=True, text=True, check=True)
        before = json.loads(done.stdout.strip().splitlines()[-1])
    order = "" if args.act_order else ", GPTQ without act-order (groups taken in the column loop)"
    print(f"## Bank of K = 12 (search_cost.py's{order}), first {args.blocks} blocks of SmolLM2-135M, built as the {args.as_.upper()} builds "
          f"it: operations per stage (each a kernel on a GPU), scalar reads (each a wait on a GPU) and the operations' memory "
          f"traffic (GB, estimated: each tensor argument read and each result written once), torch {torch.__version__}")
    head = "| stage | operations | scalar reads | traffic GB |"
    if before:
        head += f" {args.against}: operations | scalar reads | traffic GB | ratio of operations | ratio of traffic |"
    print(head + "\n|---|---:|---:|---:|" + ("---:|---:|---:|---:|---:|" if before else ""))
    stages = _order(set(now["ops"]) | set(now["reads"]) | (set(before["ops"]) | set(before["reads"]) if before else set()))
    tot = [0, 0, 0, 0, 0, 0]

    def ratio(a, b) -> str:
        return f"{a / b:.3f}" if b else ""

    for s in stages:
        o, r, b = now["ops"].get(s, 0), now["reads"].get(s, 0), now["bytes"].get(s, 0)
        tot[0] += o
        tot[1] += r
        tot[2] += b
        line = f"| {LABELS.get(s, s)} | {o:,} | {r:,} | {b / 1e9:.2f} |"
        if before:
            bo, br, bb = before["ops"].get(s, 0), before["reads"].get(s, 0), before.get("bytes", {}).get(s, 0)
            tot[3] += bo
            tot[4] += br
            tot[5] += bb
            line += f" {bo:,} | {br:,} | {bb / 1e9:.2f} | {ratio(o, bo)} | {ratio(b, bb)} |"
        print(line)
    last = f"| all | {tot[0]:,} | {tot[1]:,} | {tot[2] / 1e9:.2f} |"
    if before:
        last += f" {tot[3]:,} | {tot[4]:,} | {tot[5] / 1e9:.2f} | {ratio(tot[0], tot[3])} | {ratio(tot[2], tot[5])} |"
    print(last)
    if before:
        same_codes = now["codes"] == before["codes"] and now["keys"] == before["keys"]
        differ = sorted(k for k, v in now["entries"].items() if before["entries"].get(k) != v)
        by_gptq = [k for k in differ if "gptq" in k.split(" ")[-1]]
        worst = max(abs(a - b) / max(abs(b), 1e-30) for ra, rb in zip(now["objectives"], before["objectives"]) for a, b in zip(ra, rb))
        exact = now["fisher"] == before["fisher"] and now["rows"] == before["rows"]
        print(f"\nsame keys, codes, scales, zeros and AWQ scales: {same_codes}; largest relative difference of a layer objective: "
              f"{worst:.1e}; per-row objectives and output Fisher equal bit for bit: {exact}")
        # GPTQ's multiply-adds (counted here, not in the other checkout) may move a code across a tie: its entries alone may differ
        moved = now["fused"] and not before["fused"]
        if moved:
            print(f"entries whose codes differ: {len(differ)} of {len(now['entries'])}, of which GPTQ's (with a GPU's multiply-adds here, "
                  f"not there): {len(by_gptq)}")
        if (not same_codes and not (moved and differ == by_gptq)) or worst > (1e-3 if moved else 1e-5 if args.as_ == "gpu" else 0.0) \
                or (args.as_ == "cpu" and not exact):
            raise SystemExit("the two banks differ")


if __name__ == "__main__":
    main()
