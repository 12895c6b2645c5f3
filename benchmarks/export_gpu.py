"""The exported compressed-tensors checkpoint, loaded by transformers on a device: perplexity and
tokens/s against the unquantized model in the same process.

    python benchmarks/export_gpu.py --device cuda [--out runs/export-gpu] [--record docs/data/export/gpu.json]

Model: the packaged SmolLM2-135M-Instruct (float32, as published here). Exports, each quantized by
gransearch on ``--device`` with 128 x 512 wiki-sample train tokens and written with
``gs.save_quantized``:

* ``plan``: the plan of docs/export.md's `vllm-asym` search (docs/data/export/plan.json; AWQ
  w4g64 asymmetric everywhere), which this transformers/compressed-tensors pair loads through its
  dequantize path (``CompressedTensorsConfig(dequantize=True)``);
* ``w4g32-sym``: uniform GPTQ w4g32 symmetric, which transformers loads as a compressed model.

For the float model and for each checkpoint loaded by ``AutoModelForCausalLM.from_pretrained``
(through :func:`gransearch.export.load_in_transformers`, which also checks that the whole model is
on ``--device``: transformers 5.17's dequantize path kept it on the CPU under ``.to()``):
perplexity on the whole wiki-sample test split (seqlen 512, batch 4) and gransearch's perplexity
of its own quantized model (relative difference); prefill tokens/s (the test windows through the
model, logits for every position, best of ``--repeats``); greedy decode tokens/s (batch 1,
``--new-tokens`` new tokens after a 32-token prompt, with the KV cache, best of ``--repeats``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

import gransearch as gs

from eval_speed import machine, sync  # noqa: E402  (same folder)

HERE = os.path.dirname(os.path.abspath(__file__))


def prefill_speed(model, w: torch.Tensor, batch: int, repeats: int, device) -> float:
    """Tokens per second of forward passes over the windows ``w`` (best of ``repeats``)."""
    best = float("inf")
    with torch.no_grad():
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            for i in range(0, w.shape[0], batch):
                model(input_ids=w[i : i + batch], use_cache=False)
            sync(device)
            if r:  # the first pass warms up (and decompresses a compressed model)
                best = min(best, time.perf_counter() - t0)
    return w.numel() / best


def decode_speed(model, prompt: torch.Tensor, new_tokens: int, repeats: int, device) -> float:
    """Greedy decode tokens per second, batch 1 (best of ``repeats``)."""
    best = float("inf")
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(prompt, **kw)
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            model.generate(prompt, **kw)
            sync(device)
            best = min(best, time.perf_counter() - t0)
    return new_tokens / best


def where(model) -> torch.device:
    return next(model.parameters()).device


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids.to(where(model))).logits.float().cpu()


def measure(name, model, test, w, prompt, args, ours=None) -> dict:
    dev = args.device
    ppl = gs.perplexity(model, test, seqlen=args.seqlen, batch_size=4, max_windows=args.max_windows, verbose=False).ppl
    at = where(model)
    row = {"model": name, "ran_on": str(at), "ppl": ppl, "prefill_tok_s": prefill_speed(model, w.to(at), 4, args.repeats, dev),
           "decode_tok_s": decode_speed(model, prompt.to(at), args.new_tokens, args.repeats, dev)}
    if ours is not None:
        row["gransearch_ppl"] = ours
        row["rel_diff"] = abs(ppl - ours) / ours
    if dev is not None and torch.device(dev).type == "cuda":
        row["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda (the figure the issue asks for) or cpu")
    ap.add_argument("--out", default="runs/export-gpu")
    ap.add_argument("--plan", default=os.path.join(HERE, "..", "docs", "data", "export", "plan.json"))
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=None, help="test windows (default: the whole split)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--record", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    dev = args.device or "cpu"
    print(f"machine: {machine()}", flush=True)
    base, tok = gs.load_model("smollm2-135m")
    calib = gs.sample_windows(gs.load_tokens("wiki-sample", tok, "train"), args.n_calib, args.seqlen, seed=0)
    test = gs.load_tokens("wiki-sample", tok, "test")
    w = gs.evaluate.windows(test, args.seqlen, args.max_windows).to(dev)
    prompt = test[:32].unsqueeze(0).to(dev)
    rows = [measure("float32 (unquantized)", copy.deepcopy(base).to(dev), test, w, prompt, args)]
    exports = {"plan": gs.QuantPlan.load(args.plan), "w4g32-sym": "w4g32s"}
    for name, plan in exports.items():
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        gs.quantize(model, plan, calib, method="gptq", device=args.device, objective=False, verbose=False)
        q_s = time.perf_counter() - t0
        folder = os.path.join(args.out, name)
        saved = gs.save_quantized(model, folder, tokenizer=tok)
        model.to(dev)
        ours = gs.perplexity(model, test, seqlen=args.seqlen, batch_size=4, max_windows=args.max_windows, verbose=False).ppl
        specs = [lp.spec for lp in plan.layers.values()] if isinstance(plan, gs.QuantPlan) else [gs.QuantSpec.parse(plan)]
        symmetric = all(sp.symmetric for sp in specs)
        hf = gs.export.load_in_transformers(folder, device=dev)  # the dequantize path if asymmetric; all of it on dev
        diff = float((logits(hf, prompt) - logits(model, prompt)).abs().max())
        del model
        row = measure(f"{name} (transformers{'' if symmetric else ', dequantize'})", hf, test, w, prompt, args, ours)
        row.update(quantize_s=q_s, checkpoint_bytes=saved.file_nbytes, max_logit_diff=diff)
        rows.append(row)
        del hf
    f = rows[0]
    print(f"\n## compressed-tensors exports loaded by transformers: smollm2-135m on {dev}")
    print(f"machine: {machine()}")
    print("| model | test ppl | gransearch ppl (rel. diff) | prefill tok/s | decode tok/s | vs float (prefill, decode) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        g = f"{r['gransearch_ppl']:.4f} ({r['rel_diff']:.1e})" if "gransearch_ppl" in r else "-"
        print(f"| {r['model']} | {r['ppl']:.4f} | {g} | {r['prefill_tok_s']:,.0f} | {r['decode_tok_s']:,.1f} | "
              f"{r['prefill_tok_s'] / f['prefill_tok_s']:.2f}x, {r['decode_tok_s'] / f['decode_tok_s']:.2f}x |")
    if args.record:
        os.makedirs(os.path.dirname(os.path.abspath(args.record)), exist_ok=True)
        with open(args.record, "w") as fh:
            json.dump({"machine": machine(), "device": dev, "args": vars(args), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
