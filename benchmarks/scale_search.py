"""The whole search on a model with SmolLM2-1.7B's shapes: bank, trials, final; time, memory, bank size.

    python benchmarks/scale_search.py --device cuda [--out runs/scale] [--trials 20] [--blocks 24]
    python benchmarks/scale_search.py --blocks 1 --n-calib 2 --trials 3 --eval-windows 1   # CPU smoke run

The model is the random-initialised one of ``benchmarks/scale.py`` (written there if missing).
``gs.optimize`` runs with the bank on disk (``OUT/search/bank``), ``--trials`` trials, one finalist
re-quantized sequentially and measured; candidates: rtn, gptq, awq x 3, 4 bits x per-channel,
groups of 64 (K = 12 per layer, what ``benchmarks/search_cost.py`` times on SmolLM2) under the
w4c budget. Perplexities of random weights mean nothing: this measures cost. Printed and written
to ``OUT/search.json`` (and ``--record FILE``): wall time of each stage, peak GPU memory (CUDA) and
peak RSS, the bank's size on disk against its estimate before building, where the bank's and the
final stage's time went (``bank_stages``: GPTQ, AWQ searches, statistics, objectives...;
``final_stages``: quantize, of it the per-layer solves, evaluation), and the per-parameter rates
that ``benchmarks/project_8b.py`` scales to an 8B model. ``--awq-rank exact``: the bank's AWQ
searches on the exact Hessians (no eigendecomposition; its stage ``awq hessian factors`` then takes
no time), to compare with the default rank-64 factors at these widths (8192 for ``down_proj``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale import SHAPES, calibration, machine, make_model  # noqa: E402  (same folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/scale")
    ap.add_argument("--shape", default="smollm2-1.7b", choices=sorted(SHAPES))
    ap.add_argument("--blocks", type=int, default=24)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--device", default=None, help="cuda (the measurement) or cpu")
    ap.add_argument("--record", default=None, help="also write the results to this JSON file")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--awq-rank", default="64", help="the bank's AWQ searches: the top-N eigen-factor of each Hessian, or 'exact'")
    ap.add_argument("--from-disk", action="store_true",
                    help="search the model read from disk block by block (bank, trials, finalist written to OUT/search/finals)")
    args = ap.parse_args()

    import gransearch as gs
    from gransearch.bank import bank_size

    dev = args.device
    folder = os.path.join(args.out, f"model-{args.shape}-{args.blocks}")
    make_model(folder, args.shape, args.blocks)
    print(f"machine: {machine()}")
    t0 = time.perf_counter()
    if args.from_disk:
        disk = gs.offload.DiskModel(folder)
        model = disk.model  # shapes and config; the search reads the weights from disk
    else:  # not gs.load_model: the folder may have no tokenizer (random token ids then calibrate)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    t_load = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    n_linear = sum(r.shape[0] * r.shape[1] for r in gs.arch.model_linears(model))
    calib = calibration(folder, args.n_calib, args.seqlen)
    g = torch.Generator().manual_seed(2)
    vocab = model.config.vocab_size
    val = torch.randint(0, vocab, (args.eval_windows * args.seqlen,), generator=g)
    test = torch.randint(0, vocab, (args.eval_windows * args.seqlen,), generator=g)
    cands = (("rtn", "gptq", "awq"), (3, 4), ("channel", 64))
    est = bank_size(model, *cands)
    print(est.table(top=4))
    budget = gs.runs.budget_like(model, "w4c", "research", "float32")  # floats at float32, as loaded whole (from disk too)
    run = os.path.join(args.out, "search")
    os.makedirs(run, exist_ok=True)
    if dev and dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = gs.optimize(disk if args.from_disk else model, budget_bytes=budget, calib=calib, eval_ids=val, final_ids=test, methods=cands[0], bits=cands[1],
                      granularities=cands[2], n_trials=args.trials, eval_windows=args.eval_windows, seqlen=args.seqlen, n_final=1,
                      bank_dir=os.path.join(run, "bank"), storage=f"sqlite:///{os.path.abspath(run)}/study-{time.time_ns()}.db",
                      device=dev, awq_rank=gs.runs.awq_rank(args.awq_rank), verbose=not args.quiet)
    total = time.perf_counter() - t0
    bank_dir = os.path.join(run, "bank")
    on_disk = sum(os.path.getsize(os.path.join(bank_dir, f)) for f in os.listdir(bank_dir) if f.endswith(".safetensors"))
    out = {"machine": machine(), "shape": args.shape, "blocks": args.blocks, "params": n_params, "linear_params": n_linear,
           "device": dev or "cpu", "awq_rank": gs.runs.awq_rank(args.awq_rank), "from_disk": args.from_disk, "n_calib": args.n_calib, "seqlen": args.seqlen, "eval_windows": args.eval_windows,
           "trials": res.n_trials, "load_seconds": round(t_load, 1), "search_seconds": round(total, 1),
           "bank_seconds": round(res.bank_seconds, 1), "trial_seconds": round(res.search_seconds / max(1, res.n_trials), 2), "trial_stages": res.trial_stages,
           "final_seconds": round(total - res.bank_seconds - res.search_seconds, 1),
           "bank_stages": res.bank_stages, "final_stages": res.finals[0]["seconds"] if res.finals else {},
           "bank_bytes_on_disk": on_disk, "bank_bytes_estimated": est.total, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "command": "python benchmarks/scale_search.py " + " ".join(sys.argv[1:])}
    if dev and dev.startswith("cuda"):
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    # per-parameter rates, for benchmarks/project_8b.py
    out["bank_seconds_per_linear_param"] = res.bank_seconds / n_linear
    out["trial_seconds_per_param"] = out["trial_seconds"] / n_params
    out["bank_bytes_per_linear_param"] = on_disk / n_linear
    for path in [os.path.join(args.out, "search.json")] + ([args.record] if args.record else []):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as fh:
            json.dump(out, fh, indent=1)
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
