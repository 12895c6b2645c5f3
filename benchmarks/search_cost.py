"""Cost of the search: bank construction against one uniform GPTQ, trial time against one evaluation.

    python benchmarks/search_cost.py [--n-calib 128] [--trials 30] [--device cuda] [--profile FILE]

Bank: K = 12 candidates per layer (rtn, gptq, awq x 3, 4 bits x per-channel, groups of 64), built by
``build_bank`` (one calibration pass, one Cholesky per layer, one AWQ search per group and spec),
against one whole-model uniform GPTQ ``w4g64`` (``gs.quantize``) on the same calibration tokens, in
the same process. Trials: mean seconds per trial of ``optimize`` against one bare perplexity
evaluation of the same validation slice, and by kind of trial (:func:`trial_kinds`: the uniform
warm starts, which change every layer and are measured whole, against the trials the sampler
proposes, most of a search; 30 trials by default, of which 15 are warm starts with this grid).
``--device cuda``: every step runs on the GPU (the model stays on the CPU between blocks for
quantization and the bank; evaluations run on a copy on the GPU). The trials run twice on the same
bank: with the study in memory, and with it in a SQLite file in a temporary folder, as the CLI
keeps it (``--out DIR``: ``DIR/study.db``), so the last rows say what the storage adds to a trial, and a third time in memory (what the first search paid once per
process is gone then), each with the seconds the garbage collector took during it
(``gc_pauses.Probe``); then the same evaluation is timed as a bare copy, as the trial loop's
assembled model, reporting to Optuna and inside the stage timer (:func:`evaluation_gap`), to say
where a trial's evaluation stage differs from a bare one. On CUDA the bank is built a second time
with its GPTQ layer by layer (``gransearch.bank.STACK_SHARED_INPUTS = False``, what the CPU does) to
show what solving q/k/v and gate/up as one stack saves, and a third time with AWQ's searches on the
exact Hessians (``awq_rank=None``: no eigendecomposition for the rank-64 factor; ``--exact-awq`` on
the CPU too), to say which of the two costs a GPU less. On a GPU the device is warmed up first (one
untimed uniform GPTQ), so that no timed run pays for the process's start-up. ``--profile FILE``:
then one uniform GPTQ and one bank again, and the two evaluations (bare and the trial model's) under
``torch.profiler``, and where their time goes (:func:`profile_runs`): on a GPU, how much of each
bank stage the GPU spent computing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import tempfile
import time

import torch

import gransearch as gs
from gransearch.bank import build_bank

from eval_speed import fresh_graphs, machine, sync, warm_up  # noqa: E402  (same folder)
from gc_pauses import Probe  # noqa: E402  (same folder)


STAGE = "gransearch: "  # the profiler ranges of gransearch.bank.Stages
RUNTIME_CALLS = {  # CUDA runtime calls the profiler records on the host, counted per run
    "kernel launches": lambda n: n in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel"),
    "graph replays": lambda n: n == "cudaGraphLaunch",
    "host waits": lambda n: "Synchronize" in n,
    "copies": lambda n: n.startswith("cudaMemcpy"),
}


def _device_us(e, self_only: bool) -> float:
    """An averaged profiler event's device time in microseconds (torch renamed cuda_* to device_*)."""
    for name in (("self_device_time_total", "self_cuda_time_total") if self_only else ("device_time_total", "cuda_time_total")):
        v = getattr(e, name, None)
        if v is not None:
            return float(v)
    return 0.0


def first_blocks(model, n: int):
    """A copy of ``model`` with its first ``n`` decoder blocks only (the profiler's event tables grow
    with the work: a whole model's GPTQ kernels would take it minutes to sort)."""
    from gransearch.arch import arch_of, get_blocks, get_module

    info = arch_of(model)
    blocks = get_blocks(model, info)
    parent, _, attr = info.blocks.rpartition(".")
    holder = get_module(model, parent) if parent else model
    setattr(holder, attr, torch.nn.ModuleList(list(blocks)[:n]))  # the copy below takes n blocks, not all
    try:
        small = copy.deepcopy(model)
    finally:
        setattr(holder, attr, blocks)
    small.config.num_hidden_layers = n
    if getattr(small.config, "layer_types", None):
        small.config.layer_types = list(small.config.layer_types)[:n]
    return small


UNIFORM = "uniform plans (warm starts: every layer new, measured whole)"
WARM = "other warm starts (the knapsack with fixed weights)"
SEARCHED = "searched (the sampler's knapsack weights), all"
MEASURED = "  of which measured whole"  # a whole evaluation like the bare one: the row the trial target reads
PRUNED = "  of which pruned"
REPEATS = "  of which duplicates of a measured plan (no evaluation)"


def trial_kinds(study) -> dict[str, list[float]]:
    """The seconds of each finished trial of ``study`` (from its start to its end, as Optuna stores
    them: sampling, knapsack, duplicate check, assembly, evaluation, storage writes), by what the trial
    is. A search begins with its warm starts: one uniform plan per method and spec that fits the
    budget (every layer new to the assembly, never pruned: 9 of the first 10 trials here), then
    knapsacks of fixed weights (1 here); the trials the sampler proposes, most of a search (39 of
    the README's 60, after 15 uniform plans and 6 other warm starts), change fewer layers, may be
    pruned, and may propose a plan already measured (a duplicate: no evaluation). Kinds with no
    trial are left out."""
    import optuna

    S = optuna.trial.TrialState
    kinds: dict[str, list[float]] = {k: [] for k in (UNIFORM, WARM, SEARCHED, MEASURED, PRUNED, REPEATS)}
    for t in study.get_trials(deepcopy=False, states=(S.COMPLETE, S.PRUNED)):
        if t.datetime_start is None or t.datetime_complete is None:
            continue
        s = (t.datetime_complete - t.datetime_start).total_seconds()
        a = t.user_attrs
        if "uniform" in a:
            kinds[UNIFORM].append(s)
        elif "warm" in a or "seed" in a:
            kinds[WARM].append(s)
        else:
            kinds[SEARCHED].append(s)
            kinds[REPEATS if "duplicate_of" in a else PRUNED if t.state == S.PRUNED else MEASURED].append(s)
    return {k: v for k, v in kinds.items() if v}


def evaluation_gap(model, bank, res, val, dev, windows: int, repeats: int = 5) -> tuple[list[tuple[str, float]], dict]:
    """Why a trial's evaluation stage can take longer than a bare evaluation: the same perplexity
    (``windows`` x 512 tokens, batch 4), each the median of ``repeats`` runs after one untimed run,
    of (1) a bare copy of the float model, (2) the model as the trial loop assembles it for the best
    trial's plan, (3) that model reporting every batch to an in-memory Optuna trial (``trial.report``
    and ``should_prune``, as ``optimize`` does), and (4) inside the trial loop's stage timer (a wait
    for the GPU and a profiler range around it), and (5) each run right after assembling the other
    of the two best trials' plans, as consecutive trials run (untimed). Returns the ``(row, seconds)`` and, for
    :func:`profile_runs`, a bare evaluation and the trial model's (reporting) as functions."""
    import statistics

    import optuna

    from gransearch.bank import Stages
    from gransearch.search import _Assembler

    def run(mdl, reporting=None):
        gs.perplexity(mdl, val, seqlen=512, batch_size=4, max_windows=windows, verbose=False,
                      on_window=reporting() if reporting else None)

    def timed(mdl, reporting=None, stage=None, before=None):
        def once():
            if before is not None:
                before()
            sync(dev)
            t0 = time.perf_counter()
            with stage("evaluation") if stage is not None else contextlib.nullcontext():
                run(mdl, reporting)
            sync(dev)
            return time.perf_counter() - t0

        once()
        return statistics.median(once() for _ in range(repeats))

    done = sorted((t for t in res.study.trials if t.value is not None), key=lambda t: t.value)
    plans = [[bank.index(i, k) for i, k in enumerate(t.user_attrs["keys"])] for t in done[:2]]
    assembler = _Assembler(model, bank, dev)
    trial_model = assembler.load(plans[0])
    turn = [0]

    def switch():  # the other plan: the layers it changes read other weights, as in consecutive trials
        turn[0] += 1
        assembler.load(plans[turn[0] % len(plans)])
    bare = copy.deepcopy(model).to(dev) if dev else model
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner())

    def report():  # each evaluation reports to a trial of its own, as in the trial loop
        trial = study.ask()

        def on_window(step, running_nll):
            trial.report(running_nll, step)
            trial.should_prune()
        return on_window

    rows = [("a bare copy of the float model", timed(bare)),
            ("the trial loop's model of the best plan (assembled)", timed(trial_model)),
            ("the same, reporting each batch to an Optuna trial", timed(trial_model, report)),
            ("the same, inside the trial loop's stage timer", timed(trial_model, report, Stages(assembler.device))),
            ("the same, each run after assembling the other of the two best plans", timed(trial_model, report, Stages(assembler.device), switch))]
    assembler.load(plans[0])
    return rows, {"a bare evaluation": lambda: run(bare), "the trial model's evaluation, reporting": lambda: run(trial_model, report)}


def profile_runs(runs: dict, dev, path: str, top: int = 20) -> str:
    """Each of ``runs`` (name -> function) once under ``torch.profiler`` (the CPU, and CUDA on a GPU),
    each after an empty CUDA-graph cache; writes to ``path`` and returns, per run: the wall time under
    the profiler, the GPU's kernel time (what it computed: the rest of the wall time it waited for
    the host), the kernel launches, graph replays, host waits and copies the CUDA runtime saw, each
    bank stage's wall and kernel time (the ranges gransearch.bank.Stages opens), and the operations
    with the most host time and the most kernel time. The profiler's own overhead is in these walls:
    the timed rows of the main table are without it."""
    from torch.profiler import ProfilerActivity, profile

    cuda = dev is not None and torch.device(dev).type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    out = [f"# torch.profiler of search_cost.py's runs on {dev or 'cpu'}; machine: {machine()}"]
    for name, fn in runs.items():
        fresh_graphs()
        sync(dev)
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            fn()
            sync(dev)
            wall = time.perf_counter() - t0
        ev = prof.key_averages()
        kernel_s = sum(_device_us(e, True) for e in ev) / 1e6
        out.append(f"\n## {name}: {wall:.2f} s wall under the profiler, {kernel_s:.2f} s of GPU kernels "
                   f"({kernel_s / wall:.0%} busy)" if cuda else f"\n## {name}: {wall:.2f} s wall under the profiler (CPU)")
        if cuda:
            out.append("CUDA runtime calls: " + ", ".join(f"{k} {sum(e.count for e in ev if test(e.key)):,}" for k, test in RUNTIME_CALLS.items()))
        stages = [e for e in ev if e.key.startswith(STAGE)]
        if stages:
            out.append("\n| stage (profiler range) | entered | wall s | GPU kernel s |\n|---|---:|---:|---:|")
            for e in sorted(stages, key=lambda e: -e.cpu_time_total):
                out.append(f"| {e.key[len(STAGE):]} | {e.count} | {e.cpu_time_total / 1e6:.2f} | {_device_us(e, False) / 1e6:.2f} |")
            by = {e.key[len(STAGE):]: e for e in stages}
            if "blocks" in by:  # what the blocks spent outside their stages (the bank's "other" row)
                inner = [e for n, e in by.items() if n not in ("blocks", "output fisher", "store")]
                wall_o = (by["blocks"].cpu_time_total - sum(e.cpu_time_total for e in inner)) / 1e6
                dev_o = (_device_us(by["blocks"], False) - sum(_device_us(e, False) for e in inner)) / 1e6
                out.append(f"| in the blocks, outside these stages (RTN and AWQ roundings, Python) | | {wall_o:.2f} | {dev_o:.2f} |")
        orders = {"host time": lambda e: e.self_cpu_time_total, **({"GPU kernel time": lambda e: _device_us(e, True)} if cuda else {})}
        for what, key in orders.items():
            rows = sorted((e for e in ev if not e.key.startswith(STAGE)), key=key, reverse=True)[:top]
            out.append(f"\nthe {top} operations with the most {what}:\n| operation | calls | host self s | GPU self s |\n|---|---:|---:|---:|")
            out += [f"| {e.key[:80]} | {e.count:,} | {e.self_cpu_time_total / 1e6:.3f} | {_device_us(e, True) / 1e6:.3f} |" for e in rows]
    text = "\n".join(out) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--trials", type=int, default=30,
                    help="trials per search (default 30: 15 warm starts, 9 of them uniform plans, then 15 the sampler proposes)")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--device", default=None, help="cpu (default) or cuda")
    ap.add_argument("--profile", default=None, metavar="FILE",
                    help="afterwards, one uniform GPTQ and one bank of the model's first --profile-blocks blocks under "
                         "torch.profiler: where their time goes, written to FILE")
    ap.add_argument("--profile-blocks", type=int, default=2)
    ap.add_argument("--exact-awq", action="store_true",
                    help="also build the bank with AWQ's searches on the exact Hessians (awq_rank=None; always on CUDA)")
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

    def timed_bank(**kw):
        fresh_graphs()  # the bank captures its own CUDA graphs, as in a fresh process
        t0 = time.perf_counter()
        built = build_bank(model, calib, ("rtn", "gptq", "awq"), (3, 4), ("channel", 64), device=dev, verbose=False, **kw)
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
    t_exact = None
    if (dev and dev.startswith("cuda")) or args.exact_awq:  # AWQ's searches on the exact Hessians: no eigendecompositions
        exact, t_exact = timed_bank(awq_rank=None)

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

    pauses = [Probe() for _ in range(3)]
    t0 = time.perf_counter()
    with pauses[0]:
        res = search()
    t_all = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp, pauses[1]:  # the same trials with the study in a SQLite file, as the CLI keeps it
        on_disk = search(f"sqlite:///{os.path.join(tmp, 'study.db')}")
        kinds_db = trial_kinds(on_disk.study)  # read before the folder goes
    t_loop_db = on_disk.search_seconds / on_disk.n_trials
    with pauses[2]:
        again = search()  # a third time, in memory: what a search pays once per process (first calls, imports) is gone
    t_loop_again = again.search_seconds / again.n_trials
    t_trials = t_all / res.n_trials  # as measured so far: optimize's setup (model copy, warm-start knapsacks) shared out
    t_loop = res.search_seconds / res.n_trials  # the trial loop alone
    print(f"\n## Search cost: {args.model} on {dev or 'cpu'}, calibration {args.n_calib} x 512, K = {k} candidates per layer, {len(bank.layers)} layers")
    print("| run | seconds | ratio |\n|---|---:|---:|")
    print(f"| one uniform GPTQ w4g64 (sequential) | {t_gptq:.1f} | 1.00 |")
    print(f"| bank of K = {k} | {t_bank:.1f} | {t_bank / t_gptq:.2f} (target at most 2) |")
    if t_apart is not None:
        print(f"| the same bank, GPTQ layer by layer (q/k/v and gate/up not stacked) | {t_apart:.1f} | {t_apart / t_gptq:.2f} |")
    if t_exact is not None:
        print(f"| the same bank, AWQ's searches on the exact Hessians (awq_rank=None) | {t_exact:.1f} | {t_exact / t_gptq:.2f} |")
    print(f"| one perplexity evaluation ({args.eval_windows} x 512 validation tokens) | {t_eval:.1f} | 1.00 |")
    print(f"| mean seconds per trial ({res.n_trials} trials, pruned ones included) | {t_trials:.2f} | {t_trials / t_eval:.2f} |")
    print(f"| of which the trial loop alone (setup of {t_all - res.search_seconds:.2f} s left out) | {t_loop:.2f} | {t_loop / t_eval:.2f} |")
    print(f"| the trial loop with the study in SQLite (as the CLI runs it) | {t_loop_db:.2f} | {t_loop_db / t_eval:.2f} |")
    print(f"| the trial loop in memory again (the process's third search) | {t_loop_again:.2f} | {t_loop_again / t_eval:.2f} |")
    print(f"\nbank stages (seconds, of {t_bank:.1f}): " + ", ".join(f"{k} {v:.1f}" for k, v in bank.stage_seconds.items()))
    if t_apart is not None:
        print(f"bank stages, GPTQ layer by layer (of {t_apart:.1f}): " + ", ".join(f"{k} {v:.1f}" for k, v in apart.stage_seconds.items()))
    if t_exact is not None:
        print(f"bank stages, AWQ on the exact Hessians (of {t_exact:.1f}): " + ", ".join(f"{k} {v:.1f}" for k, v in exact.stage_seconds.items()))
    for (name, r), gcp in zip((("in memory", res), ("in SQLite", on_disk), ("in memory, third search", again)), pauses):
        print(f"trial loop stages, study {name} (seconds per trial, of {r.search_seconds / r.n_trials:.3f}): "
              + ", ".join(f"{k} {v / r.n_trials:.3f}" for k, v in r.trial_stages.items())
              + f"; garbage collection during the whole search: {gcp}")
    print(f"\n## Trials by kind: seconds from a trial's start to its end, against one bare evaluation ({t_eval:.3f} s)")
    print("| search | trials | count | mean seconds | ratio |\n|---|---|---:|---:|---:|")
    for name, kinds in (("in memory, third search", trial_kinds(again.study)), ("in SQLite", kinds_db)):
        for kind, secs in kinds.items():
            mean = sum(secs) / len(secs)
            print(f"| {name} | {kind} | {len(secs)} | {mean:.3f} | {mean / t_eval:.2f}{' (target at most 1.5)' if kind == MEASURED else ''} |")
    gap, evals = evaluation_gap(model, bank, res, val, dev, args.eval_windows)
    print(f"\n## Where a trial's evaluation differs from a bare one ({args.eval_windows} x 512 tokens, median of 5)")
    print("| evaluation | seconds | ratio |\n|---|---:|---:|")
    print("\n".join(f"| {name} | {s:.3f} | {s / gap[0][1]:.2f} |" for name, s in gap))
    if args.profile:
        small = first_blocks(model, args.profile_blocks)

        def uniform():
            gs.quantize(copy.deepcopy(small), "w4g64", calib, method="gptq", objective=False, device=dev, verbose=False)

        def bank_again():
            build_bank(small, calib, ("rtn", "gptq", "awq"), (3, 4), ("channel", 64), device=dev, verbose=False)

        n = args.profile_blocks
        profile_runs({f"one uniform GPTQ w4g64, first {n} blocks": uniform, f"bank of K = {k}, first {n} blocks": bank_again, **evals},
                     dev, args.profile)
        print(f"\nprofile (where the time of one uniform GPTQ and one bank of the first {n} blocks goes): {args.profile}")


if __name__ == "__main__":
    main()
