"""The search of a model read from disk against the same search in memory: time, peak memory, and
the same trial values.

    python benchmarks/disk_search.py [--out runs/disk-search] [--trials 8] [--record FILE]

Model: the packaged SmolLM2-135M-Instruct as a float32 folder (gransearch's converted copy, with
its tokenizer). Both runs share one candidate bank, built once from disk (RTN x 3, 4, 8 bits x
per-channel and groups of 64: 6 candidates per layer, no output Fisher, as a bank from disk has
none), so that their trials can be compared one by one. Each run is a fresh child process:

* ``memory``: ``gs.optimize(model)`` on the model loaded whole;
* ``disk``: ``gs.optimize(gs.offload.DiskModel(folder))``: every trial reads the blocks from the
  folder, replaces their linears with the trial's bank entries and scores them block by block;
  the finalist is quantized from disk into a checkpoint, which is measured as written.

Budget: uniform w4g64's bytes; proxy: 4 x 512 validation tokens; final: 8 x 512 test tokens.
Printed: wall seconds per stage and peak RSS of each run, and whether every trial value is equal.
Run again on the same ``--out``, it reuses the bank and starts both studies afresh.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def child(args) -> None:
    import torch

    import gransearch as gs
    from gransearch.bank import Bank

    from transformers import AutoTokenizer

    if args.trim_mib is not None:
        gs.offload.TRIM_BYTES = args.trim_mib << 20
    folder = args.model_dir
    tok = AutoTokenizer.from_pretrained(folder)  # not the model: the disk run must not hold it
    calib = gs.sample_windows(gs.load_tokens("wiki-sample", tok, "train"), args.n_calib, 512, seed=0)
    val = gs.load_tokens("wiki-sample", tok, "validation")
    test = gs.load_tokens("wiki-sample", tok, "test")[: 8 * 512]
    bank_dir = os.path.join(args.out, "bank")
    fresh_bank = not os.path.exists(os.path.join(bank_dir, "bank.json"))  # else a run before built it: reused, not rebuilt
    t0 = time.perf_counter()
    if args.mode == "disk":
        model = gs.offload.DiskModel(folder)
        net = model.model
        bank = None if fresh_bank else Bank.load(bank_dir)
    else:
        from transformers import AutoModelForCausalLM

        model = net = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        bank = Bank.load(bank_dir)  # the bank the disk run built: the same candidates
    t_load = time.perf_counter() - t0
    budget = gs.runs.budget_like(net, "w4g64", "research", "float32")
    res = gs.optimize(model, budget_bytes=budget, calib=calib, eval_ids=val, final_ids=test, methods=("rtn",), bits=(3, 4, 8),
                      granularities=("channel", 64), n_trials=args.trials, eval_windows=4, n_final=1, bank=bank,
                      bank_dir=bank_dir if bank is None else None, final_dir=os.path.join(args.out, f"finals-{args.mode}"),
                      storage=f"sqlite:///{os.path.abspath(args.out)}/study-{args.mode}.db", study_name=args.mode, verbose=False)
    total = time.perf_counter() - t0
    values = [t.value for t in sorted(res.study.trials, key=lambda t: t.number) if t.value is not None]
    built = res.bank_seconds if bank is None else 0.0  # spent here; a loaded bank's record keeps its build time
    out = {"mode": args.mode, "load_seconds": round(t_load, 1), "total_seconds": round(total - built, 1),
           "bank_seconds": round(res.bank_seconds, 1), "trial_seconds": round(res.search_seconds / max(1, res.n_trials), 2),
           "final_seconds": round(total - t_load - built - res.search_seconds, 1), "proxy_ppl": res.proxy_ppl,
           "final_ppl": res.ppl, "plan": res.plan.summary(), "values": values,
           "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "trim_bytes": gs.offload.TRIM_BYTES}
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/disk-search")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--record", default=None)
    ap.add_argument("--trim-mib", type=int, default=None,
                    help="hand freed memory back once the resident set grew this much (default: gransearch's TRIM_BYTES; 0: at every block)")
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        return child(args)
    import gransearch as gs
    from gransearch.models import _resolve

    sys.path.insert(0, HERE)
    from eval_speed import machine  # noqa: E402  (same folder)

    gs.load_model("smollm2-135m")  # converts the packaged GGUF once, into the cache folder read below
    folder = _resolve("smollm2-135m")
    os.makedirs(args.out, exist_ok=True)
    for mode in ("disk", "memory"):  # each run times fresh trials (a study left here would resume, running none); the bank is kept
        for name in (f"study-{mode}.db", f"study-{mode}.db.lock"):
            if os.path.exists(os.path.join(args.out, name)):
                os.remove(os.path.join(args.out, name))
        shutil.rmtree(os.path.join(args.out, f"finals-{mode}"), ignore_errors=True)
    rows = {}
    for mode in ("disk", "memory"):  # disk first: it builds the shared bank
        cmd = [sys.executable, __file__, "--mode", mode, "--model-dir", folder, "--out", args.out, "--trials", str(args.trials),
               "--n-calib", str(args.n_calib)] + ([] if args.trim_mib is None else ["--trim-mib", str(args.trim_mib)])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
        rows[mode] = json.loads(line[-1][len("RESULT "):])
    d, m = rows["disk"], rows["memory"]
    print(f"\n## The search from disk against in memory: smollm2-135m, {args.trials} trials, shared bank of 6 candidates per layer")
    print(f"machine: {machine()}")
    print("| stage | in memory | from disk | ratio |\n|---|---:|---:|---:|")
    print(f"| bank, built once from disk (s) | | {d['bank_seconds']} | |")
    for key, label in (("load_seconds", "load (s)"), ("trial_seconds", "one trial (s)"),
                       ("final_seconds", "final: quantize + test ppl (s)"), ("total_seconds", "total without the bank (s)")):
        print(f"| {label} | {m[key]} | {d[key]} | {d[key] / m[key]:.2f} |")
    print(f"| peak RSS (GB) | {m['peak_rss'] / 1e9:.2f} | {d['peak_rss'] / 1e9:.2f} | {d['peak_rss'] / m['peak_rss']:.2f} |")
    same = d["values"] == m["values"]
    print(f"\ntrial values identical: {same} ({len(d['values'])} trials); same plan: {d['plan'] == m['plan']}; "
          f"final ppl {m['final_ppl']:.4f} in memory, {d['final_ppl']:.4f} from the checkpoint written from disk")
    if args.record:
        with open(args.record, "w") as fh:
            json.dump({"machine": machine(), "command": "python benchmarks/disk_search.py " + " ".join(sys.argv[1:]), **rows}, fh,
                      indent=1)


if __name__ == "__main__":
    main()
