"""Perplexity evaluation: overhead against a bare forward pass, and peak memory of the chunked loss.

    python benchmarks/eval_speed.py [--model smollm2-135m] [--windows 16] [--repeats 3] [--device cuda]

Part 1 -- speed: tokens per second of ``gransearch.perplexity`` against a bare ``model(x)`` forward
(logits for every position, no loss) over the same batches of 4 x 512 tokens, in one process,
interleaved and repeated; the best time of each is kept.

Part 2 -- memory: a tiny random Gemma-3-like model with a 262,144-token vocabulary scores one batch
of 8 x 512 tokens, (a) with ``gransearch.perplexity`` and (b) with the naive loss
``cross_entropy(model(x).logits, ...)``. Each runs in a fresh child process; the figure is the
peak resident memory during scoring minus the resident memory once the model is built.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``""`` where there is none): GPTQ's float
    arithmetic, so the last digits of a result, moves with it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def machine() -> str:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    cpu = platform.processor() or platform.machine()
    name = cpu_name()
    return (f"{cpu}{f' ({name})' if name else ''}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"{dev}")


def sync(device) -> None:
    """Wait for queued GPU work, so that wall-clock timings are honest."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def warm_up(model, calib, device, spec: str = "w4g64", in_place: bool = False) -> bool:
    """On a GPU, one untimed uniform GPTQ of ``model`` (of a copy unless ``in_place``) on 8
    calibration windows, then an empty CUDA-graph cache: the timed runs after it pay neither for the
    process's first use of the device (CUDA context, cuBLAS and cuSOLVER handles, kernels loaded on
    first call), which a real run pays once, nor get graphs another run captured (each captures its
    own, as in a fresh process; see :func:`fresh_graphs`). Does nothing on the CPU; returns whether
    it ran."""
    if device is None or torch.device(device).type != "cuda":
        return False
    import copy

    import gransearch as gs

    work = model if in_place else copy.deepcopy(model)
    gs.quantize(work, spec, calib[:8], method="gptq", objective=False, device=device, verbose=False)
    sync(device)
    fresh_graphs()
    return True


def fresh_graphs() -> None:
    """Empty GPTQ's cache of captured CUDA graphs, so that the next timed run captures its own."""
    from gransearch.algorithms.gptq import set_cuda_graphs

    set_cuda_graphs(set_cuda_graphs(False))


def speed(model_name: str, n_windows: int, repeats: int, batch: int, seqlen: int, device=None) -> None:
    import gransearch as gs

    model, tok = gs.load_model(model_name, device=device)
    ids = gs.load_tokens("wiki-sample", tok, "test")
    w = gs.evaluate.windows(ids, seqlen, n_windows).to(next(model.parameters()).device)
    n_tok = w.numel()

    @torch.no_grad()
    def bare():
        for i in range(0, w.shape[0], batch):
            model(input_ids=w[i : i + batch], use_cache=False)
        sync(device)

    def ours():
        gs.perplexity(model, ids, seqlen=seqlen, batch_size=batch, max_windows=n_windows, verbose=False)
        sync(device)

    bare()  # warm-up
    t_bare, t_ours = [], []
    for _ in range(repeats):
        for fn, acc in ((bare, t_bare), (ours, t_ours)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    tb, to = min(t_bare), min(t_ours)
    print(f"\n## Speed: {model_name} on {device or 'cpu'}, {n_windows} windows x {seqlen} tokens, batch {batch}, best of {repeats}")
    print("| run | seconds | tokens/s | ratio |\n|---|---:|---:|---:|")
    print(f"| bare forward (logits, no loss) | {tb:.2f} | {n_tok / tb:,.0f} | 1.000 |")
    print(f"| gransearch.perplexity | {to:.2f} | {n_tok / to:,.0f} | {to / tb:.3f} |")
    print(f"overhead: {100 * (to / tb - 1):+.1f}% (target: within 5%)")


def mem_child(mode: str, vocab: int, batch: int, seqlen: int) -> None:
    """Runs in a child: prints JSON with the peak RSS growth while scoring one batch."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    import gransearch as gs

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=seqlen,
                           sliding_window=128, final_logit_softcapping=None)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    ids = torch.randint(0, vocab, (batch * seqlen,))
    base = gs.offload.resident_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if mode == "ours":
        ppl = gs.perplexity(model, ids, seqlen=seqlen, batch_size=batch, verbose=False).ppl
    else:
        with torch.no_grad():
            x = ids.view(batch, seqlen)
            logits = model(input_ids=x, use_cache=False).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), x[:, 1:].reshape(-1))
            ppl = float(torch.exp(loss))
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"mode": mode, "ppl": ppl, "seconds": dt, "peak_growth": peak - base, "peak_raised": peak > peak_before,
                      "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))


def memory(vocab: int, batch: int, seqlen: int) -> None:
    rows = []
    for mode in ("naive", "ours"):
        out = subprocess.run([sys.executable, __file__, "--mem-child", mode, "--vocab", str(vocab), "--mem-batch", str(batch)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    naive, ours = rows
    print(f"\n## Peak memory: tiny Gemma-3-like model, vocab {vocab:,}, batch {batch} x {seqlen}")
    print(f"model parameters: {naive['model_bytes'] / 2**20:.0f} MiB; full float32 logits would be {batch * seqlen * vocab * 4 / 2**30:.2f} GiB")
    print("| loss | peak RSS growth while scoring | seconds | perplexity |\n|---|---:|---:|---:|")
    for r, name in ((naive, "naive cross_entropy(model(x).logits)"), (ours, "gransearch.perplexity (chunked)")):
        print(f"| {name} | {r['peak_growth'] / 2**20:,.0f} MiB | {r['seconds']:.2f} | {r['ppl']:.2f} |")
    print(f"memory ratio naive/ours: {naive['peak_growth'] / max(ours['peak_growth'], 1):.1f}x; "
          f"perplexities agree to {abs(naive['ppl'] - ours['ppl']) / naive['ppl']:.1e} (relative)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=262_144)
    ap.add_argument("--mem-batch", type=int, default=8)
    ap.add_argument("--mem-child", choices=("naive", "ours"))
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-memory", action="store_true", help="skip part 2 (host memory; CPU only)")
    ap.add_argument("--device", default=None, help="cpu (default) or cuda, for part 1")
    args = ap.parse_args()
    if args.mem_child:
        mem_child(args.mem_child, args.vocab, args.mem_batch, 512)
        return
    print(f"machine: {machine()}")
    if not args.skip_speed:
        speed(args.model, args.windows, args.repeats, batch=4, seqlen=512, device=args.device)
    if not args.skip_memory:
        memory(args.vocab, args.mem_batch, 512)


if __name__ == "__main__":
    main()
