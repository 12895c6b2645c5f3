"""A model larger than the memory it is quantized in: SmolLM2-1.7B's shapes, read block by block.

    python benchmarks/scale.py --out runs/scale [--methods rtn,gptq] [--n-calib 4] [--seqlen 2048]
                               [--check rtn,gptq] [--device cuda] [--blocks 24]

1. Writes a random-initialised model with SmolLM2-1.7B's shapes (hidden 2048, 24 blocks, MLP
   8192, 32 heads, vocabulary 49152, tied embeddings; about 1.71 B parameters) as bf16 safetensors,
   one shard per block, once (``OUT/model``; the tokenizer is SmolLM2-135M's, which has the same
   vocabulary, when the packaged model is installed).
2. For each method, a fresh process quantizes it with ``w4g64`` from disk
   (``gs.quantize(folder, ..., save=DIR)``) and reports its peak resident memory, the checkpoint's
   size and the time, against the model's float32 size. The memory cap is half the float32 size:
   the run passes when its peak RSS stays below it.
3. ``--check``: another process loads the float model whole (no cap), quantizes it in memory with
   the same calibration, and checks that the checkpoint written from disk holds the same codes and
   gives the same logits. (Perplexity on random weights means nothing; equality does.)

Results go to ``OUT/scale.json`` and, with ``--record FILE``, to a JSON file kept in the repo.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from eval_speed import machine  # same folder

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SHAPES = {  # config.json of HuggingFaceTB/SmolLM2-1.7B (the fields that set the shapes)
    "smollm2-1.7b": dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    # a smoke-test shape (the scripts' paths in seconds, before a long run or a GPU session)
    "tiny": dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=True,
                 bos_token_id=1, eos_token_id=2),
}


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def make_model(folder: str, shape: str, blocks: int, seed: int = 0) -> None:
    """The random model, written one block at a time (never whole in memory)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from gransearch.offload import empty_model

    if os.path.isfile(os.path.join(folder, "model.safetensors.index.json")):
        return
    os.makedirs(folder, exist_ok=True)
    cfg = LlamaConfig(**{**SHAPES[shape], "num_hidden_layers": blocks})
    cfg.dtype = "bfloat16"
    skeleton = empty_model(cfg, torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    names = [n for n, _ in skeleton.named_parameters() if n != "lm_head.weight"]
    groups: dict[str, list[str]] = {}
    for n in names:
        key = n.split(".")[2] if n.startswith("model.layers.") else "rest"
        groups.setdefault(key, []).append(n)
    params = dict(skeleton.named_parameters())
    weight_map = {}
    for k, (key, group) in enumerate(groups.items()):
        tensors = {}
        for n in group:
            p = params[n]
            if p.dim() == 1:  # norms: ones, as initialised
                tensors[n] = torch.ones(p.shape, dtype=torch.bfloat16)
            else:
                tensors[n] = (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16)
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in tensors})
        print(f"  wrote {fname} ({key})", flush=True)
    cfg.save_pretrained(folder)
    try:
        from transformers import AutoTokenizer

        from gransearch.models import _resolve

        AutoTokenizer.from_pretrained(_resolve("smollm2-135m")).save_pretrained(folder)
    except Exception as exc:  # the tokenizer only decides which tokens calibrate
        print(f"  (no tokenizer: {exc}; random token ids calibrate)")
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh, indent=1)


def calibration(folder: str, n: int, seqlen: int) -> torch.Tensor:
    import gransearch as gs

    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        return gs.sample_windows(gs.load_tokens("wiki-sample", tok, "train"), n, seqlen, seed=0)
    except (OSError, ValueError):
        return torch.randint(0, SHAPES["smollm2-1.7b"]["vocab_size"], (n, seqlen), generator=torch.Generator().manual_seed(0))


def eval_ids(n: int = 2, seqlen: int = 128) -> torch.Tensor:
    return torch.randint(0, SHAPES["smollm2-1.7b"]["vocab_size"], (n, seqlen), generator=torch.Generator().manual_seed(1))


def run_from_disk(args) -> dict:
    """Child process: quantize from disk, report memory and time."""
    import gransearch as gs

    calib = calibration(args.model_dir, args.n_calib, args.seqlen)
    base = peak_rss()
    t0 = time.perf_counter()
    res = gs.quantize(args.model_dir, args.spec, calib, args.method, save=args.save, batch_size=args.batch_size, device=args.device,
                      verbose=not args.quiet)
    seconds = time.perf_counter() - t0
    out = {"method": args.method, "spec": args.spec, "mode": res.mode, "seconds": round(seconds, 1), "peak_rss": peak_rss(),
           "rss_before_quantize": base, "checkpoint_bytes": folder_bytes(args.save), "quantized_bytes": res.saved.quantized_nbytes,
           "layers": len(res.records), "layer_seconds": round(sum(r.seconds for r in res.records), 1),
           "calib_tokens": int(calib.numel())}
    if args.device and str(args.device).startswith("cuda"):
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return out


def run_check(args) -> dict:
    """Child process: the same quantization in memory; the checkpoint must hold its codes and logits."""
    from transformers import AutoModelForCausalLM

    import gransearch as gs

    calib = calibration(args.model_dir, args.n_calib, args.seqlen)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    gs.quantize(model, args.spec, calib, args.method, batch_size=args.batch_size, device=args.device, verbose=not args.quiet)
    seconds = time.perf_counter() - t0
    x = eval_ids()
    with torch.no_grad():
        want = model(x).logits
    codes = {n: m.quantized_weight() for n, m in model.named_modules() if isinstance(m, gs.QuantLinear)}
    del model
    back = gs.load_quantized(args.save, dtype=torch.float32)
    same = 0
    for n, m in back.named_modules():
        if isinstance(m, gs.QuantLinear):
            a, b = codes[n], m.quantized_weight()
            same += bool(torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
                         and ((a.zero is None and b.zero is None) or torch.equal(a.zero, b.zero)))
    with torch.no_grad():
        got = back(x).logits
    return {"method": args.method, "in_memory_seconds": round(seconds, 1), "layers": len(codes), "layers_identical": same,
            "logits_equal": bool(torch.equal(want, got)), "logits_max_abs_diff": float((want - got).abs().max()),
            "in_memory_peak_rss": peak_rss()}


def child(kind: str, args, method: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--model-dir", args.model_dir, "--method", method, "--spec", args.spec,
           "--save", os.path.join(args.out, f"q-{method}"), "--n-calib", str(args.n_calib), "--seqlen", str(args.seqlen),
           "--batch-size", str(args.batch_size)] + (["--device", args.device] if args.device else []) + (["--quiet"] if args.quiet else [])
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} run of {method} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/scale")
    ap.add_argument("--shape", default="smollm2-1.7b", choices=sorted(SHAPES))
    ap.add_argument("--blocks", type=int, default=24, help="decoder blocks (default: the shape's 24)")
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--check", default="", help="methods whose checkpoint is checked against an in-memory run (e.g. rtn,gptq)")
    ap.add_argument("--spec", default="w4g64")
    ap.add_argument("--n-calib", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=2048, help="calibration window (default: 2048, the large-model protocol)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--device", default=None)
    ap.add_argument("--record", default=None, help="also write the results to this JSON file")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        out = run_from_disk(args) if args.child == "disk" else run_check(args)
        print(json.dumps(out))
        return

    from gransearch.offload import float32_nbytes

    args.model_dir = os.path.join(args.out, f"model-{args.shape}-{args.blocks}")
    print(f"machine: {machine()}; memory {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB")
    t0 = time.perf_counter()
    make_model(args.model_dir, args.shape, args.blocks)
    print(f"model: {args.model_dir} ({time.perf_counter() - t0:.0f} s to write)")
    fp32 = float32_nbytes(args.model_dir)
    cap = fp32 // 2
    disk = folder_bytes(args.model_dir)
    print(f"float32 size {fp32 / 1e9:.2f} GB; on disk (bf16) {disk / 1e9:.2f} GB; memory cap (half the float32 size) {cap / 1e9:.2f} GB")
    rows, checks = [], []
    for method in [m for m in args.methods.split(",") if m]:
        r = child("disk", args, method)
        r["under_cap"] = r["peak_rss"] < cap
        rows.append(r)
        print(f"{method:6s} {args.spec}: {r['seconds']:8.1f} s  peak RSS {r['peak_rss'] / 1e9:5.2f} GB = "
              f"{r['peak_rss'] / fp32:.2f}x float32 ({'under' if r['under_cap'] else 'OVER'} the cap)  checkpoint "
              f"{r['checkpoint_bytes'] / 1e9:.3f} GB = {r['checkpoint_bytes'] / disk:.3f}x the bf16 model", flush=True)
    for method in [m for m in args.check.split(",") if m]:
        c = child("check", args, method)
        checks.append(c)
        print(f"check {method}: {c['layers_identical']}/{c['layers']} layers identical, logits equal: {c['logits_equal']} "
              f"(max |diff| {c['logits_max_abs_diff']:.3g}); in memory {c['in_memory_seconds']} s, peak RSS "
              f"{c['in_memory_peak_rss'] / 1e9:.2f} GB", flush=True)
    result = {"machine": machine(), "shape": args.shape, "blocks": args.blocks, "float32_bytes": fp32, "bf16_disk_bytes": disk,
              "memory_cap_bytes": cap, "n_calib": args.n_calib, "seqlen": args.seqlen, "batch_size": args.batch_size,
              "device": args.device or "cpu", "runs": rows, "checks": checks,
              "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:])}
    os.makedirs(args.out, exist_ok=True)
    for path in [os.path.join(args.out, "scale.json")] + ([args.record] if args.record else []):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1)
    failed = [r["method"] for r in rows if not r["under_cap"]] + [c["method"] for c in checks if not (c["logits_equal"] and c["layers_identical"] == c["layers"])]
    if failed:
        raise SystemExit(f"failed: {failed}")


if __name__ == "__main__":
    main()
