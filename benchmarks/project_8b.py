"""A projection (not a measurement) of an 8B model's cost, from the rates measured on the 1.7B shape.

    python benchmarks/project_8b.py [--cpu docs/data/scale/cpu-smollm2-1.7b-shape.json]
                                    [--gpu-quantize docs/data/scale/gpu-h200-quantize.json]
                                    [--gpu docs/data/scale/gpu-h200-search.json] [--out docs/data/scale/projection-8b.json]

Target: Llama-3-8B's shapes (hidden 4096, 32 blocks, MLP 14336, 8 KV heads, vocabulary 128256,
untied head). Exact, from shapes alone: the w4g64 checkpoint's bytes (compressed-tensors, floats
in bf16) and the K = 12 bank's size on disk (:func:`gransearch.bank.bank_size`). Projected from the
measured runs (``benchmarks/scale.py``, on the CPU and, with ``--gpu-quantize``, on a GPU):

* RTN time scales with the linear parameters;
* GPTQ time is split as measured into the per-layer solves, scaled by ``sum(out * in^2)`` over the
  linears (the column loop's lazy-batch updates), and the rest (calibration passes through the
  blocks), scaled by the linear parameters at the same token count;
* peak memory = the measured peak's unexplained part + the embeddings as stored + one block in
  float32 + four ``[in, in]`` float32 matrices of the widest input (the Hessian, its factorisation)
  + the calibration states, each of these terms for the target.

With a GPU search record (``benchmarks/scale_search.py --device cuda``) the search is projected
too. Its bank and its final stage mix work that grows with the linear parameters (calibration
passes, rounding, objectives) and work that grows with ``sum(out * in^2)`` (GPTQ's solves); the
record does not split them, so each is given as a range between the two scalings. A trial
(assembling the plan from the bank, one evaluation) scales with all parameters. The GPU memory row
is the sum of its two largest terms on one H100, not a projection of the measured peak: the
search's model in float32, and the trial cache's cap (a quarter of the device's memory).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

H100_BYTES = 81559 * 2**20  # one H100 80GB HBM3's memory as CUDA reports it
TARGET = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
              num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False)


def shapes_of(config: dict):
    from transformers import LlamaConfig

    import gransearch as gs
    from gransearch.offload import empty_model

    model = empty_model(LlamaConfig(**config), torch.float32)
    lin = [r.shape for r in gs.arch.model_linears(model)]
    n_params = sum(p.numel() for p in model.parameters())
    return model, lin, n_params


def block_params(lin, blocks: int) -> int:
    return sum(o * i for o, i in lin) // blocks


def memory_terms(config: dict, lin, calib_tokens: int, calibrated: bool) -> float:
    """Bytes of the peak's known terms (see the module docstring); RTN has no Hessian and no states."""
    emb = config["vocab_size"] * config["hidden_size"] * 2  # kept as stored (bf16)
    block = 4 * block_params(lin, config["num_hidden_layers"])
    if not calibrated:
        return emb + block
    widest = max(i for _, i in lin)
    states = 2 * 4 * calib_tokens * config["hidden_size"]  # inputs and outputs of a block (in memory or spilled: the bound)
    return emb + block + 4 * 4 * widest * widest + states


def gpu_name(rec: dict) -> str:
    return rec["machine"].split(",")[-1].strip().removeprefix("NVIDIA ")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", default="docs/data/scale/cpu-smollm2-1.7b-shape.json")
    ap.add_argument("--gpu-quantize", default="docs/data/scale/gpu-h200-quantize.json", help="benchmarks/scale.py --device cuda's record")
    ap.add_argument("--gpu", default="docs/data/scale/gpu-h200-search.json", help="benchmarks/scale_search.py --device cuda's record")
    ap.add_argument("--out", default="docs/data/scale/projection-8b.json")
    args = ap.parse_args()

    import gransearch as gs
    from gransearch.bank import bank_size
    from gransearch.search import trial_cache_bytes

    import scale  # noqa: E402  (same folder)

    def record(path):
        if not (path and os.path.exists(path)):
            return None
        with open(path) as fh:
            return json.load(fh)

    cpu, gq, gpu = record(args.cpu), record(args.gpu_quantize), record(args.gpu)
    src_cfg = {**scale.SHAPES[cpu["shape"]], "num_hidden_layers": cpu["blocks"]}
    _, src_lin, src_params = shapes_of(src_cfg)
    model, lin, params = shapes_of(TARGET)
    src_linear, linear = sum(o * i for o, i in src_lin), sum(o * i for o, i in lin)
    src_cube, cube = sum(o * i * i for o, i in src_lin), sum(o * i * i for o, i in lin)
    lo, hi = linear / src_linear, cube / src_cube  # the two scalings (see the module docstring)
    spec = gs.QuantSpec.parse("w4g64")
    ckpt = sum(gs.layer_nbytes(s, spec, format="compressed-tensors") for s in lin) + 2 * (params - linear)
    bank = bank_size(model, ("rtn", "gptq", "awq"), (3, 4), ("channel", 64))
    out = {"label": "projection from the measured 1.7B-shape rates, not a measurement", "target": TARGET, "params": params,
           "linear_params": linear, "checkpoint_w4g64_bytes": ckpt, "bank_k12_bytes": bank.total,
           "from": {k: path for k, path, rec in (("cpu", args.cpu, cpu), ("gpu_quantize", args.gpu_quantize, gq), ("gpu", args.gpu, gpu)) if rec}}
    rows = [("parameters", f"{src_params / 1e9:.2f} B", f"{params / 1e9:.2f} B", "exact"),
            ("w4g64 checkpoint (compressed-tensors, bf16 floats)", f"{cpu['runs'][0]['checkpoint_bytes'] / 1e9:.2f} GB", f"{ckpt / 1e9:.2f} GB",
             "exact, from shapes"),
            ("bank, K = 12 (rtn/gptq/awq x 3,4 bits x channel,g64) on disk", f"{gpu['bank_bytes_on_disk'] / 1e9:.2f} GB" if gpu else "",
             f"{bank.total / 1e9:.1f} GB", "exact bound, from shapes")]

    def quantize_rows(rec, prefix: str) -> None:
        """Project each run of a ``benchmarks/scale.py`` record (RTN, GPTQ from disk) to the target."""
        where = f"one {gpu_name(rec)}" if rec["device"] != "cpu" else f"this CPU ({rec['machine'].split(',')[1].strip()})"
        for r in rec["runs"]:
            if r["method"] == "rtn":
                t = r["seconds"] * lo
            else:  # the per-layer solves scale as sum(out * in^2), the rest with the linear parameters
                solve = r.get("layer_seconds", r["seconds"])
                t = solve * hi + (r["seconds"] - solve) * lo
            tokens = r.get("calib_tokens", rec["n_calib"] * rec["seqlen"])
            calibrated = r["method"] != "rtn"
            mem = max(0.0, r["peak_rss"] - memory_terms(src_cfg, src_lin, tokens, calibrated)) + memory_terms(TARGET, lin, tokens, calibrated)
            out[f"{prefix}{r['method']}_from_disk_seconds"] = round(t)
            out[f"{prefix}{r['method']}_from_disk_peak_rss"] = int(mem)
            took = f"{t / 60:.0f} min" if t >= 120 else f"{t:.0f} s"
            rows.append((f"{r['method'].upper()} w4g64 from disk on {where}: time", f"{r['seconds']:.0f} s", took, "projected"))
            rows.append((f"{r['method'].upper()} w4g64 from disk on {where}: peak RSS", f"{r['peak_rss'] / 1e9:.2f} GB", f"{mem / 1e9:.1f} GB",
                         "projected"))

    quantize_rows(cpu, "")
    if gq:
        quantize_rows(gq, "gpu_")
    if gpu:
        on = f"one {gpu_name(gpu)}"
        tr = gpu["trial_seconds"] * params / gpu["params"]
        bank_s, final = (gpu["bank_seconds"] * lo, gpu["bank_seconds"] * hi), (gpu["final_seconds"] * lo, gpu["final_seconds"] * hi)
        total = tuple(b + gpu["trials"] * tr + f for b, f in zip(bank_s, final))
        model_f32, cache = 4 * params, trial_cache_bytes(H100_BYTES)
        out.update(gpu_bank_seconds=[round(x) for x in bank_s], gpu_trial_seconds=round(tr, 1), gpu_final_seconds=[round(x) for x in final],
                   gpu_search_seconds=[round(x) for x in total], gpu_search_trials=gpu["trials"], gpu_memory_terms_h100=model_f32 + cache)
        mins = lambda pair: f"{pair[0] / 60:.0f} to {pair[1] / 60:.0f} min"  # noqa: E731
        rows.append((f"bank K = 12 on {on}", f"{gpu['bank_seconds']:.0f} s", mins(bank_s), "projected, range"))
        rows.append((f"one trial on {on}", f"{gpu['trial_seconds']:.1f} s", f"{tr:.1f} s", "projected"))
        rows.append((f"final stage on {on}", f"{gpu['final_seconds']:.0f} s", mins(final), "projected, range"))
        rows.append((f"whole search ({gpu['trials']} trials) on {on}", f"{gpu['search_seconds']:.0f} s", mins(total), "projected, range"))
        rows.append((f"search peak GPU memory ({on})", f"{gpu['peak_gpu_bytes'] / 1e9:.1f} GB", "", "measured only"))
        rows.append(("GPU memory: float32 model + trial cache cap on one H100", "", f"{(model_f32 + cache) / 1e9:.1f} GB",
                     "sum of two terms, not a peak"))
    else:
        rows.append(("GPU search", "not measured (no GPU lent)", "", ""))
    print("| | 1.7B shape (measured) | 8B shape | how |\n|---|---:|---:|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
