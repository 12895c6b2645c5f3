"""Cost of the search: bank construction against one uniform GPTQ, trial time against one evaluation.

    python benchmarks/search_cost.py [--n-calib 128] [--trials 10] [--device cuda]

Bank: K = 12 candidates per layer (rtn, gptq, awq x 3, 4 bits x per-channel, groups of 64), built by
``build_bank`` (one calibration pass, one Cholesky per layer, one AWQ search per group and spec),
against one whole-model uniform GPTQ ``w4g64`` (``gs.quantize``) on the same calibration tokens,
in the same process. Trials: mean seconds per trial of ``optimize`` against one bare perplexity
evaluation of the same validation slice. ``--device cuda``: every step runs on the GPU (the
model stays on the CPU between blocks for quantization and the bank; evaluations run on a copy on
the GPU). The trials run twice on the same bank: with the study in memory, and with it in a SQLite
file in a temporary folder, as the CLI keeps it (``--out DIR``: ``DIR/study.db``), so the last rows
say what the storage adds to a trial. On CUDA the bank is built a second time with its GPTQ layer
by layer (``gransearch.bank.STACK_SHARED_INPUTS = False``, what the CPU does) to show what
solving q/k/v and gate/up as one stack saves.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import gransearch as gs
from gransearch.bank import build_bank

from eval_speed import fresh_graphs, machine, sync, warm_up  # noqa: E402  (same folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--device", default=None, help="cpu (default) or cuda")
    args = ap.parse_args()
    dev = args.device
    print(f"machine: {machine()}")
    model, tok = gs.load_model(args.model)
    calib = gs.sample_windows(gs.load_tokens("wiki-sample", tok, "train"), args.n_calib, 512, seed=0)
    val = gs.load_tokens("wiki-sample", tok, "validation")

    warm_up(model, calib, dev)  # the first use of the GPU is no part of either timed run
    work, _ = gs.load_model(args.model)
    t0 = time.perf_counter()
    gs.quantize(work, "w4g64", calib, method="gptq", objective=False, device=dev, verbose=False)
    sync(dev)
    t_gptq = time.perf_counter() - t0
    del work

    def timed_bank():
        fresh_graphs()  # the bank captures its own CUDA graphs, as in a fresh process
        t0 = time.perf_counter()
        built = build_bank(model, calib, ("rtn", "gptq", "awq"), (3, 4), ("channel", 64), device=dev, verbose=False)
        sync(dev)
        return built, time.perf_counter() - t0

    bank, t_bank = timed_bank()
    k = len(bank.keys[0])
    t_apart = None
    if dev and dev.startswith("cuda"):  # the same bank with GPTQ layer by layer, as the CPU does (and the GPU did)
        from gransearch import bank as bank_mod

        bank_mod.STACK_SHARED_INPUTS = False
        apart, t_apart = timed_bank()
        bank_mod.STACK_SHARED_INPUTS = None

    bare = copy.deepcopy(model).to(dev) if dev else model
    gs.perplexity(bare, val, seqlen=512, batch_size=4, max_windows=2, verbose=False)  # warm-up
    t0 = time.perf_counter()
    gs.perplexity(bare, val, seqlen=512, batch_size=4, max_windows=args.eval_windows, verbose=False)
    sync(dev)
    t_eval = time.perf_counter() - t0
    del bare
    budget = gs.QuantPlan.uniform(model, "w4c", "rtn").nbytes(model)

    def search(storage=None):
        return gs.optimize(model, budget_bytes=budget, calib=calib, eval_ids=val, methods=("rtn", "gptq", "awq"), bits=(3, 4),
                           granularities=("channel", 64), n_trials=args.trials, eval_windows=args.eval_windows, n_final=0, bank=bank,
                           device=dev, storage=storage, verbose=False)

    t0 = time.perf_counter()
    res = search()
    t_all = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:  # the same trials with the study in a SQLite file, as the CLI keeps it
        on_disk = search(f"sqlite:///{os.path.join(tmp, 'study.db')}")
    t_loop_db = on_disk.search_seconds / on_disk.n_trials
    t_trials = t_all / res.n_trials  # as measured so far: optimize's setup (model copy, warm-start knapsacks) shared out
    t_loop = res.search_seconds / res.n_trials  # the trial loop alone
    print(f"\n## Search cost: {args.model} on {dev or 'cpu'}, calibration {args.n_calib} x 512, K = {k} candidates per layer, {len(bank.layers)} layers")
    print("| run | seconds | ratio |\n|---|---:|---:|")
    print(f"| one uniform GPTQ w4g64 (sequential) | {t_gptq:.1f} | 1.00 |")
    print(f"| bank of K = {k} | {t_bank:.1f} | {t_bank / t_gptq:.2f} (target at most 2) |")
    if t_apart is not None:
        print(f"| the same bank, GPTQ layer by layer (q/k/v and gate/up not stacked) | {t_apart:.1f} | {t_apart / t_gptq:.2f} |")
    print(f"| one perplexity evaluation ({args.eval_windows} x 512 validation tokens) | {t_eval:.1f} | 1.00 |")
    print(f"| mean seconds per trial ({res.n_trials} trials, pruned ones included) | {t_trials:.2f} | {t_trials / t_eval:.2f} |")
    print(f"| of which the trial loop alone (setup of {t_all - res.search_seconds:.2f} s left out) | {t_loop:.2f} | {t_loop / t_eval:.2f} |")
    print(f"| the trial loop with the study in SQLite (as the CLI runs it) | {t_loop_db:.2f} | {t_loop_db / t_eval:.2f} |")
    print(f"\nbank stages (seconds, of {t_bank:.1f}): " + ", ".join(f"{k} {v:.1f}" for k, v in bank.stage_seconds.items()))
    if t_apart is not None:
        print(f"bank stages, GPTQ layer by layer (of {t_apart:.1f}): " + ", ".join(f"{k} {v:.1f}" for k, v in apart.stage_seconds.items()))
    for name, r in (("in memory", res), ("in SQLite", on_disk)):
        print(f"trial loop stages, study {name} (seconds per trial, of {r.search_seconds / r.n_trials:.3f}): "
              + ", ".join(f"{k} {v / r.n_trials:.3f}" for k, v in r.trial_stages.items()))


if __name__ == "__main__":
    main()
