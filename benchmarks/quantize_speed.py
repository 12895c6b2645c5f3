"""Whole-model GPTQ cost on the packaged SmolLM2-135M against its floor.

    python benchmarks/quantize_speed.py [--spec w4g64] [--n-calib 128] [--seqlen 512] [--device cuda]

Floor: two forward passes of every block over the calibration tokens (what a sequential method
must do at least: one pass to collect statistics, one through the quantized block), timed in the
same process with the same block runner. Peak memory: the process's peak resident set against the
model's own parameter bytes (measured after loading, before calibration); with ``--device cuda``
the blocks run on the GPU one at a time and the GPU's peak allocated memory is reported too.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import gransearch as gs
from gransearch.calibrate import BlockRunner

from eval_speed import fresh_graphs, machine, sync, warm_up  # noqa: E402  (same folder)


def rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--spec", default="w4g64")
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--device", default=None, help="where the blocks run: cpu (default) or cuda")
    ap.add_argument("--graphs-only", action="store_true",
                    help="only the eager-against-CUDA-graphs comparison, on one random block of SmolLM2-135M's shapes")
    args = ap.parse_args()
    dev = args.device
    if args.graphs_only:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                          num_hidden_layers=1, vocab_size=256)
        print(f"machine: {machine()}")
        graphs_against_eager(LlamaForCausalLM(cfg), args.spec, dev)
        return
    print(f"machine: {machine()}")
    model, tok = gs.load_model(args.model)
    calib = gs.sample_windows(gs.load_tokens("wiki-sample", tok, "train"), args.n_calib, args.seqlen, seed=0)
    if warm_up(model, calib, dev, args.spec, in_place=True):  # the first use of the GPU is no part of either timed run
        del model
        model, _ = gs.load_model(args.model)  # the float weights again
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    peak_loaded = rss_peak()

    # floor: capture + 2 passes per block, same runner and batches as quantize()
    t0 = time.perf_counter()
    runner = BlockRunner(model, calib, batch_size=8, device=dev)
    for i in range(len(runner.blocks)):
        runner.blocks[i].to(runner.device)
        runner.run(i)
        runner.run(i, advance=True)
        runner.blocks[i].to(runner.home)
    sync(dev)
    floor = time.perf_counter() - t0
    del runner

    fresh_graphs()  # GPTQ captures its own CUDA graphs, as in a fresh process
    t0 = time.perf_counter()
    res = gs.quantize(model, args.spec, calib, method="gptq", act_order=args.act_order, objective=False, device=dev, verbose=False)
    sync(dev)
    wall = time.perf_counter() - t0
    peak = rss_peak()
    gptq_s = sum(r.seconds for r in res.records)
    n_tok = args.n_calib * args.seqlen
    print(f"\n## Whole-model GPTQ {args.spec}{' act-order' if args.act_order else ''}: {args.model} on {dev or 'cpu'}, calibration {args.n_calib} x {args.seqlen} = {n_tok:,} tokens")
    print("| run | seconds | ratio to floor |\n|---|---:|---:|")
    print(f"| floor: 2 block passes | {floor:.1f} | 1.00 |")
    print(f"| gransearch.quantize(method='gptq') | {wall:.1f} | {wall / floor:.2f} |")
    print(f"| of which GPTQ solves (all {len(res.records)} layers) | {gptq_s:.1f} | {gptq_s / floor:.2f} |")
    print(f"\npeak RSS {peak / 2**30:.2f} GiB; model parameters {model_bytes / 2**30:.2f} GiB; "
          f"peak minus model {(peak - model_bytes) / 2**30:.2f} GiB (after load: {peak_loaded / 2**30:.2f} GiB); target: model + 1.5 GB")
    if dev is not None and torch.device(dev).type == "cuda":
        print(f"GPU peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print(f"target: wall time at most 1.3x the floor on the CPU, 3x on a GPU -> "
          f"{'met' if wall / floor <= (3.0 if dev and torch.device(dev).type == 'cuda' else 1.3) else 'NOT met'}")
    if dev is not None and torch.device(dev).type == "cuda":
        graphs_against_eager(gs.load_model(args.model)[0], args.spec, dev)  # the float weights again


def graphs_against_eager(model, spec: str, dev) -> None:
    """One block's GPTQ solves (its weights, a random well-conditioned Hessian per input width),
    in this process: eager against CUDA graphs (whether the codes are identical), and the graphs
    with the column loop's multiply-adds (the default on a GPU) against the separate operations the
    CPU runs (how many codes differ)."""
    import importlib

    from gransearch.algorithms.gptq import set_cuda_graphs
    from gransearch.arch import block_linears, linear_weight

    gptq_mod = importlib.import_module("gransearch.algorithms.gptq")
    sp = gs.QuantSpec.parse(spec)
    refs = list(block_linears(model, 0))
    g = torch.Generator().manual_seed(0)
    hess = {}
    for r in refs:
        n = r.shape[1]
        if n not in hess:
            X = torch.randn(2 * n, n, generator=g)
            hess[n] = (2 * X.T @ X / X.shape[0]).to(dev)
    Ws = [linear_weight(r.module).detach().float().to(dev) for r in refs]
    modes = {"eager (one launch per operation)": (False, None),
             "CUDA graphs (one replay per lazy batch)": (True, None),
             "CUDA graphs, the CPU's separate operations (no multiply-adds)": (True, False)}
    times, codes = {}, {}
    for name in list(modes) * 2:  # warm each, keep the second
        graphs, fused = modes[name]
        old, old_fused = set_cuda_graphs(graphs), gptq_mod.FUSED_MULTIPLY_ADDS
        gptq_mod.FUSED_MULTIPLY_ADDS = fused
        try:
            sync(dev)
            t0 = time.perf_counter()
            codes[name] = [gs.gptq(W, hess[W.shape[1]], sp).qweight.codes for W in Ws]
            sync(dev)
            times[name] = time.perf_counter() - t0
        finally:
            set_cuda_graphs(old)
            gptq_mod.FUSED_MULTIPLY_ADDS = old_fused
    eager, graphed, separate = list(modes)
    same = all(torch.equal(a, b) for a, b in zip(codes[eager], codes[graphed]))
    differ = sum(int((a != b).sum()) for a, b in zip(codes[graphed], codes[separate]))
    total = sum(c.numel() for c in codes[graphed])
    print(f"\n## One block's {len(Ws)} GPTQ solves ({spec}), eager against CUDA graphs, same process")
    print("| column loop | seconds | ratio |\n|---|---:|---:|")
    print("\n".join(f"| {name} | {times[name]:.3f} | {times[name] / times[eager]:.2f} |" for name in modes))
    print(f"codes identical, eager and graphs: {same}; codes that differ between multiply-adds and separate operations: {differ:,} of {total:,}")


if __name__ == "__main__":
    main()
