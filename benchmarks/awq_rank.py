"""AWQ's searches in the bank with the rank-64 factor of each Hessian against the exact Hessian.

    python benchmarks/awq_rank.py [--blocks 2] [--device cuda] [--record FILE]

The bank's AWQ candidates (``awq`` at 3 and 4 bits, per channel and groups of 64: those of
``benchmarks/search_cost.py``'s bank) for the first ``--blocks`` decoder blocks of SmolLM2-135M,
on 128 calibration windows of 512 tokens, built twice in one process: with ``awq_rank=64`` (the
default: the scale and clip searches measure the error with the top-64 eigen-factor of each
Hessian, made by one float64 eigendecomposition per scaling group) and with ``awq_rank=None``
(the exact Hessian: no eigendecomposition, more arithmetic per grid point). Both record the exact
layer objective ``tr((W - Q) H (W - Q)^T)`` of every entry, so the two banks' objectives say
what the factor's approximation costs in the choices it makes, and the stage seconds say what each
costs in time (``awq hessian factors`` is the eigendecompositions). The output Fisher is left out
(``fisher_windows=0``): neither form touches it. The order of the two builds alternates over
``--rounds`` and each form's fastest build is kept; the objectives are the same in every round.

``--ppl N`` (with ``--blocks 30``, the whole model): also each form's uniform AWQ plans, every
linear taking its bank entry of one spec (as a trial assembles it), measured by perplexity on N
validation windows of 512 tokens: whether the lower layer objectives show in the model's loss.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(1, HERE)

import gransearch as gs  # noqa: E402
from gransearch.arch import arch_of, get_blocks  # noqa: E402
from gransearch.bank import build_bank  # noqa: E402
from gransearch.search import _Assembler  # noqa: E402
from eval_speed import machine, sync  # noqa: E402  (same folder)
from search_cost import first_blocks  # noqa: E402
from vs_llmcompressor import commit  # noqa: E402

FORMS = {"rank 64 (default)": 64, "exact Hessian": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--device", default=None, help="cpu (default) or cuda")
    ap.add_argument("--record", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--ppl", type=int, default=0, metavar="N",
                    help="also the perplexity of each form's uniform AWQ plans on N validation windows (needs the whole model)")
    args = ap.parse_args()
    dev = args.device
    model, tok = gs.load_model("smollm2-135m")
    calib = gs.sample_windows(gs.load_tokens("wiki-sample", tok, "train"), args.n_calib, 512, seed=0)
    n_blocks = len(get_blocks(model, arch_of(model)))
    if args.ppl and args.blocks != n_blocks:
        raise SystemExit(f"--ppl measures the whole model: give --blocks {n_blocks}")
    small = first_blocks(model, args.blocks) if args.blocks != n_blocks else model
    if dev:
        build_bank(first_blocks(model, 1), calib[:8], ("awq",), (4,), ("channel",), fisher_windows=0, device=dev, verbose=False)  # warm-up
    banks, seconds, stages = {}, {f: math.inf for f in FORMS}, {}
    for r in range(args.rounds):
        for form in (list(FORMS) if r % 2 == 0 else list(FORMS)[::-1]):
            sync(dev)
            t0 = time.perf_counter()
            bank = build_bank(small, calib, ("awq",), (3, 4), ("channel", 64), awq_rank=FORMS[form], fisher_windows=0, device=dev,
                              verbose=False)
            sync(dev)
            t = time.perf_counter() - t0
            if form in banks:  # the same choices every round
                assert [[e.objective for e in row] for row in bank.entries] == [[e.objective for e in row] for row in banks[form].entries]
            banks[form] = bank
            if t < seconds[form]:
                seconds[form], stages[form] = t, bank.stage_seconds
    low, exact = (banks[f] for f in FORMS)
    ratios, same, by_spec = [], 0, {}
    for keys, a, b in zip(low.keys, low.entries, exact.entries):
        for key, x, y in zip(keys, a, b):
            ratio = y.objective / x.objective
            ratios.append(ratio)
            by_spec.setdefault(key.split(":")[1], []).append(ratio)
            same_scales = (x.in_scale is None) == (y.in_scale is None) and (x.in_scale is None or torch.equal(x.in_scale, y.in_scale))
            same += same_scales and torch.equal(x.qweight.codes, y.qweight.codes)
    geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
    print(f"# commit {commit()}, {machine()}, device {dev or 'cpu'}; AWQ entries of SmolLM2-135M's first {args.blocks} blocks "
          f"(awq x 3, 4 bits x per-channel, g64), {args.n_calib} x 512 calibration tokens, best of {args.rounds} round(s)")
    print("\n| AWQ's searches measure with | bank seconds | stages (seconds) |\n|---|---:|---|")
    for form in FORMS:
        print(f"| {form} | {seconds[form]:.2f} | " + ", ".join(f"{k} {v:.2f}" for k, v in stages[form].items() if v) + " |")
    print(f"\nentries with the same scales and codes: {same} of {len(ratios)}")
    print("\n| spec | entries | exact / rank-64 layer objective: geometric mean | lowest | highest |\n|---|---:|---:|---:|---:|")
    for spec, rs in by_spec.items():
        print(f"| {spec} | {len(rs)} | {math.exp(sum(map(math.log, rs)) / len(rs)):.4f} | {min(rs):.4f} | {max(rs):.4f} |")
    print(f"| all | {len(ratios)} | {geo:.4f} | {min(ratios):.4f} | {max(ratios):.4f} |")
    ppl = {}
    if args.ppl:
        val = gs.load_tokens("wiki-sample", tok, "validation")
        def ppl_of(m) -> float:
            return gs.perplexity(m.to(dev) if dev else m, val, seqlen=512, batch_size=4, max_windows=args.ppl, verbose=False).ppl

        ppl["float model"] = {"": ppl_of(copy.deepcopy(model))}
        print(f"\n| uniform plan ({args.ppl} x 512 validation tokens) | " + " | ".join(FORMS) + " |\n|---|" + "---:|" * len(FORMS))
        print(f"| the float model | {ppl['float model']['']:.3f} |" + " |" * (len(FORMS) - 1))
        for spec in by_spec:
            row = {}
            for form in FORMS:
                bank = banks[form]  # the plan assembled as the trial loop assembles it
                work = _Assembler(model, bank, dev).load([bank.index(i, f"awq:{spec}") for i in range(len(bank.layers))])
                row[form] = ppl_of(work)
                del work
            ppl[spec] = row
            print(f"| awq:{spec} | " + " | ".join(f"{row[f]:.3f}" for f in FORMS) + " |")
    if args.record:
        with open(args.record, "w") as fh:
            json.dump({"commit": commit(), "machine": machine(), "device": dev or "cpu", "blocks": args.blocks, "seconds": seconds,
                       "stages": stages, "same_entries": same, "entries": len(ratios), "objective_ratio_geomean": geo,
                       "objective_ratio_by_spec": {k: math.exp(sum(map(math.log, v)) / len(v)) for k, v in by_spec.items()},
                       "perplexity": ppl}, fh, indent=1)


if __name__ == "__main__":
    main()
