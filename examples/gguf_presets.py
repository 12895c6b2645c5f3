"""llama.cpp's own presets against the gguf-profile search at each preset's file size, all scored by llama.cpp.

    python examples/gguf_presets.py --out runs/gguf [--presets Q2_K,Q3_K_S,Q3_K_M,Q4_0,Q4_K_M] [--trials 20]
    python examples/gguf_presets.py --model gemma3-270m --out runs/gguf-gemma --max-windows 16 --eval-windows 4
    python examples/gguf_presets.py --report runs/gguf      # the tables of docs/gguf.md

Protocol: SmolLM2-135M-Instruct (or ``--model gemma3-270m``) from the packaged GGUF, computed in float32 and written as an F32
GGUF (its metadata and tokenizer copied). llama.cpp's presets are made from that file by
``llama_model_quantize`` (llama-cpp-python 0.3.36), once without and once with an importance matrix
computed from gransearch's calibration statistics (128 x 512 tokens of wiki-sample train, seed 0:
the mean of x^2 per input column of every linear). The search (``profile="gguf"``: Q4_0, Q5_0 and
Q8_0 per linear from RTN, GPTQ with act-order, AWQ and llama.cpp's own quantizer with that
importance matrix, IQ4_NL from llama.cpp's quantizer, plus Q2_K..Q6_K and IQ4_XS where a layer's
rows are multiples of 256 weights; the token embedding in the type the preset gave it) runs at each preset's exact tensor bytes, on
the same calibration, with a proxy of ``--eval-windows`` x 512 validation tokens (16); its best plan is re-quantized,
written as GGUF and scored. Every perplexity in the table is llama.cpp's (CPU, default context:
F16 KV cache) on the same test windows (seqlen 512). Killed, the same command resumes: finished
rows are kept in results.json, the bank and the studies in --out.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time

import gransearch as gs
from gransearch import llamacpp
from gransearch.errors import BudgetError
from gransearch.evaluate import Perplexity
from gransearch.export import gguf as G

METHODS = ("rtn", "gptq", "awq", "llamacpp")


def _types(path: str) -> dict:
    import gguf

    c = collections.Counter()
    for t in gguf.GGUFReader(path).tensors:
        kind = t.name.split(".")[-2] if t.name.startswith("blk.") else t.name.rsplit(".", 1)[0]
        if t.tensor_type.name != "F32" or kind not in ("attn_norm", "ffn_norm", "output_norm"):
            c[f"{kind}:{t.tensor_type.name}"] += 1
    return dict(sorted(c.items()))


def _tensor_bytes(path: str) -> int:
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _linear_bytes(path: str) -> int:
    """Bytes of the block linears' tensors (what bits per weight are counted over)."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if t.name.startswith("blk.") and t.name.split(".")[-2] in _LINEARS)


def _embd_type(types: dict) -> str:
    return next(k.split(":")[1] for k in types if k.startswith("token_embd:"))


def _imatrix(model, calib, path: str) -> dict:
    from safetensors.numpy import load_file, save_file

    if not os.path.exists(path):
        stats = gs.calibrate(model, calib)
        save_file(llamacpp.imatrix_from_stats(stats, G.gguf_names(model)), path)
        del stats
    return load_file(path)


def run(args) -> None:
    os.makedirs(args.out, exist_ok=True)
    res_path = os.path.join(args.out, "results.json")
    rows = json.load(open(res_path)) if os.path.exists(res_path) else {}

    def keep(name, row):
        rows[name] = row
        with open(res_path + ".tmp", "w") as fh:
            json.dump(rows, fh, indent=1)
        os.replace(res_path + ".tmp", res_path)
        print(name, json.dumps(row))

    model, tok = gs.load_model(args.model)
    calib = gs.sample_windows(gs.load_tokens("wiki-sample", tok, "train"), 128, 512, seed=0)
    val = gs.load_tokens("wiki-sample", tok, "validation")
    test = gs.load_tokens("wiki-sample", tok, "test")

    f32 = os.path.join(args.out, "f32.gguf")

    def kl_score(path):
        if not args.kl_windows:
            return {}
        r = llamacpp.kl_divergence(path, f32, test, seqlen=512, max_windows=args.kl_windows, verbose=False)
        return {"kl": r.kl, "kl_se": r.kl_se, "top1": r.top1, "kl_windows": r.n_windows, "kl_ppl": r.ppl}

    def ppl_score(path):
        r = llamacpp.perplexity(path, test, seqlen=512, max_windows=args.max_windows, verbose=False)
        return {"ppl": r.ppl, "tokens": r.n_tokens, "seconds": r.seconds, "window_nll": list(r.window_nll)}

    def score(path):
        return {**ppl_score(path), **kl_score(path)}

    def rescored(name: str, path: str) -> None:
        """A row scored before the per-window NLLs or the KL divergence were kept: what it lacks, from its file."""
        row = dict(rows[name])
        if "window_nll" not in row:
            row.update(ppl_score(path))
        if args.kl_windows and row.get("kl_windows") != args.kl_windows:
            row.update(kl_score(path))
        if row != rows[name]:
            keep(name, row)

    def stale(name: str) -> bool:
        return name in rows and ("window_nll" not in rows[name] or bool(args.kl_windows and rows[name].get("kl_windows") != args.kl_windows))

    if not os.path.exists(f32):
        G.save_gguf(model, f32, source=args.model, embd_type="F32")
    if "f32" not in rows:
        lin_weights = sum(r.module.weight.numel() for i in range(len(gs.arch.get_blocks(model))) for r in gs.arch.block_linears(model, i))
        keep("f32", {"kind": "reference", "model": args.model, "tensor_bytes": _tensor_bytes(f32), "linear_weights": lin_weights, **score(f32)})
    if "source" not in rows:
        src = gs.models.packaged_gguf(args.model)
        keep("source", {"kind": "reference", "tensor_bytes": _tensor_bytes(src), "types": _types(src), **score(src)})
    imat = _imatrix(model, calib, os.path.join(args.out, "imatrix.safetensors"))

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    for preset in presets:
        for with_imatrix in (False, True):
            name = f"{preset}{'+imatrix' if with_imatrix else ''}"
            path = os.path.join(args.out, f"{name}.gguf")
            if stale(name):  # the file is remade in seconds
                llamacpp.quantize_file(f32, path, preset, imatrix=imat if with_imatrix else None)
                rescored(name, path)
                os.remove(path)
            if name in rows:
                continue
            t0 = time.perf_counter()
            llamacpp.quantize_file(f32, path, preset, imatrix=imat if with_imatrix else None)
            keep(name, {"kind": "llama.cpp", "preset": preset, "imatrix": with_imatrix, "tensor_bytes": _tensor_bytes(path),
                        "linear_bytes": _linear_bytes(path),
                        "quantize_seconds": time.perf_counter() - t0, "types": _types(path), **score(path)})
            os.remove(path)  # the sizes and types are recorded; the files are remade in seconds

    del model
    seeded = [p.strip() for p in args.seeded.split(",") if p.strip()]
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    tag = "" if methods == METHODS else f"[{'+'.join(methods)}]"  # another candidate set: its own rows, study and bank
    kl_tag = "{kl}" if args.proxy == "kl" else ""  # another proxy: its own rows and studies (the bank is shared)
    for preset, seed in [(p, False) for p in presets] + [(p, True) for p in seeded]:
        name = f"search{tag}{kl_tag}{'+seed' if seed else ''}@{preset}"
        suffix = f"{'-seeded' if seed else ''}{'-' + '-'.join(methods) if tag else ''}{'-kl' if kl_tag else ''}"
        path = os.path.join(args.out, f"search-{preset}{suffix}.gguf")
        if stale(name) and os.path.exists(path):
            rescored(name, path)
        if name in rows:
            continue
        budget = rows[preset]["tensor_bytes"]
        model, _ = gs.load_model(args.model)
        embd = _embd_type(rows[preset]["types"])
        if embd != "Q8_0":
            raise SystemExit(f"{preset} stores the token embedding as {embd}; the gguf profile counts it as Q8_0")
        G.round_embeddings(model, embd)  # the embedding as the preset's file stores it
        seeds = {f"llama.cpp {preset}+imatrix": _preset_plan(f32, args.out, preset, imat, model)} if seed else None
        t0 = time.perf_counter()
        try:
            res = gs.optimize(model, budget_bytes=budget, calib=calib, eval_ids=val, final_ids=None, methods=methods, bits=(4, 5, 8),
                              granularities=(32,), n_trials=args.trials, n_final=0, profile="gguf", seed_plans=seeds, eval_windows=args.eval_windows,
                              storage=f"sqlite:///{os.path.abspath(args.out)}/study.db", proxy=args.proxy,
                              study_name=f"gguf-{budget}{suffix}",
                              bank_dir=os.path.join(args.out, "bank" + ("-" + "-".join(methods) if tag else "")), device=args.device)
        except BudgetError as exc:
            keep(name, {"kind": "search", "preset": preset, "budget_bytes": budget, "infeasible": str(exc)})
            continue
        search_s = time.perf_counter() - t0
        res.plan.save(os.path.join(args.out, f"plan-{preset}{suffix}.json"))
        gs.quantize(model, res.plan, calib, device=args.device, objective=False)
        saved = G.save_gguf(model, path, source=args.model, embd_type=embd)
        torch_ppl = gs.perplexity(model, test, seqlen=512, batch_size=4, max_windows=args.max_windows, verbose=False).ppl
        by_kind = collections.defaultdict(collections.Counter)
        for n, lp in res.plan.layers.items():
            by_kind[n.rsplit(".", 1)[-1]][f"{lp.method}:{G.ggml_type_of(lp.spec)}"] += 1
        won = [t.user_attrs.get("kind") for t in res.study.trials if t.number == res.plan.meta.get("trial")]
        keep(name, {"kind": "search", "preset": preset, "seeded": seed, "methods": list(methods), "best_kind": won[0] if won else None,
                    "budget_bytes": budget, "tensor_bytes": saved.tensor_nbytes, "linear_bytes": _linear_bytes(path),
                    "plan_bytes": res.nbytes, "proxy": args.proxy, "proxy_ppl": res.proxy_ppl, "torch_ppl": torch_ppl, "trials": res.n_trials,
                    "search_seconds": search_s, "types": _types(path), "by_kind": {k: dict(v.most_common()) for k, v in by_kind.items()},
                    **score(path)})  # the file is kept (runs/ is not in git): later scorings read it
        del model
    print(report_text(rows))


def _preset_plan(f32: str, out: str, preset: str, imat: dict, model) -> dict:
    """llama.cpp's preset (with the importance matrix) as a plan of bank candidates: each tensor's
    type made by the llamacpp method (Q4_1/Q5_1, outside the gguf profile, become Q4_0/Q5_0)."""
    import gguf

    path = os.path.join(out, f"seed-{preset}.gguf")
    llamacpp.quantize_file(f32, path, preset, imatrix=imat)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    os.remove(path)
    spec = {"Q4_0": "w4g32s", "Q4_1": "w4g32s", "Q5_0": "w5g32s", "Q5_1": "w5g32s", "Q8_0": "w8g32s"}
    return {hf: f"llamacpp:{spec.get(types[g], types[g])}" for hf, g in G.gguf_names(model).items()}


def paired(row: dict, base: dict) -> str:
    """The perplexity change of ``row`` against ``base`` on the same test windows, +- its standard error."""
    if row is base or "window_nll" not in row or "window_nll" not in base:
        return "-"
    change, se = Perplexity(row["ppl"], 0, 0, 0, 0, 0, tuple(row["window_nll"])).paired_change(
        Perplexity(base["ppl"], 0, 0, 0, 0, 0, tuple(base["window_nll"])))
    return f"{100 * change:+.2f}% +- {100 * se:.2f}%"


def report_text(rows: dict) -> str:
    ref = rows.get("f32", {})
    # another candidate set or proxy; the KL proxy's searches first
    tags = sorted({k.split("@")[0] for k in rows if k.startswith(("search[", "search{"))}, key=lambda t: ("{kl}" not in t, t))

    def label(t: str) -> str:
        """``search[llamacpp]{kl}`` -> ``llamacpp only, KL proxy``."""
        methods = t[t.index("[") + 1 : t.index("]")].replace("+", ", ") + " only" if "[" in t else "all methods"
        return f"{methods}, {'KL' if '{kl}' in t else 'perplexity'} proxy"

    out = [f"{ref.get('model', 'smollm2-135m')}: F32 model, scored by llama.cpp: {ref.get('ppl', float('nan')):.3f} "
           f"({ref.get('tensor_bytes', 0):,} tensor bytes, {ref.get('tokens', 0):,} predicted tokens)", "",
           "| preset size | tensor bytes | bits/weight (linears) | llama.cpp preset | preset + imatrix |"
           + "".join(f" search, {label(t)} |" for t in tags) + " search, all methods, perplexity proxy | the same, seeded with the preset |",
           "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(tags)]
    lin_weights = ref.get("linear_weights", 106_168_320)  # (rows made before it was recorded: SmolLM2's linear weights)
    fixed = 49_152 * 576 // 32 * 34 + 61 * 576 * 4  # (likewise: SmolLM2's Q8_0 token embedding and F32 norms)

    def search(kind: str, p: str, nbytes: int) -> str:
        s = rows.get(f"{kind}@{p}") or next((v for k, v in rows.items() if k.startswith(f"{kind}@") and v.get("budget_bytes") == nbytes), {})
        return f"{s['ppl']:.3f}" if "ppl" in s else ("infeasible" if "infeasible" in s else "-")

    for name, r in rows.items():
        if r.get("kind") != "llama.cpp" or r.get("imatrix"):
            continue
        p = r["preset"]
        im = rows.get(f"{p}+imatrix", {})
        bpw = 8 * r.get("linear_bytes", r["tensor_bytes"] - fixed) / lin_weights
        out.append(f"| {p} | {r['tensor_bytes']:,} | {bpw:.3f} | {r['ppl']:.3f} | {im.get('ppl', float('nan')):.3f} |"
                   + "".join(f" {search(t, p, r['tensor_bytes'])} |" for t in tags)
                   + f" {search('search', p, r['tensor_bytes'])} | {search('search+seed', p, r['tensor_bytes'])} |")
    scored = [(k, v) for k, v in rows.items() if "kl" in v]
    if scored:
        n = sorted({v["kl_windows"] for _, v in scored})
        out += ["", f"KL divergence from the F32 file, llama.cpp, first {'/'.join(map(str, n))} test windows (mean per token, "
                    "+- its standard error over windows; lower is closer to the float model):", "",
                "| size | file | test perplexity | against the imatrix preset (paired over windows) | KL divergence | same top token |",
                "|---|---|---:|---:|---:|---:|"]
        sizes = set()
        for name, r in rows.items():
            if r.get("kind") != "llama.cpp" or r.get("imatrix") or r["tensor_bytes"] in sizes:
                continue
            size = r["tensor_bytes"]
            sizes.add(size)
            for k, v in scored:
                if v.get("budget_bytes", v.get("tensor_bytes")) == size or k in (name, f"{name}+imatrix"):
                    what = v.get("note") or (f"search, {label(k.split('@')[0])}" if k.startswith("search") else k.split("@")[0])
                    out.append(f"| {r['preset']} | {what} | {v['ppl']:.3f} | {paired(v, rows.get(name + '+imatrix', {}))} | "
                               f"{v['kl']:.4f} +- {v['kl_se']:.4f} | {100 * v['top1']:.2f}% |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a packaged model: smollm2-135m or gemma3-270m")
    ap.add_argument("--out", default="runs/gguf")
    ap.add_argument("--eval-windows", type=int, default=16, help="validation windows of the search's proxy")
    ap.add_argument("--presets", default="Q2_K,Q3_K_S,Q3_K_M,Q4_0,Q4_K_M")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--methods", default=",".join(METHODS), help="the search's methods (another set gets rows, a study and a bank of its own)")
    ap.add_argument("--seeded", default="", help="presets whose size is searched again with llama.cpp's own mix as a warm start")
    ap.add_argument("--max-windows", type=int, default=None, help="test windows scored (default: the whole test split)")
    ap.add_argument("--proxy", default="ppl", choices=("ppl", "kl"), help="the search's proxy (kl: its own rows and studies)")
    ap.add_argument("--kl-windows", type=int, default=20,
                    help="first test windows on which llama.cpp's KL divergence from the F32 file is scored too (0: none); "
                         "rows scored before get it on the next run where their file is there or remade")
    ap.add_argument("--device", default=None)
    ap.add_argument("--report", default=None, metavar="FOLDER", help="print the tables of a finished run")
    args = ap.parse_args()
    if args.report:
        print(report_text(json.load(open(os.path.join(args.report, "results.json")))))
        return
    run(args)


if __name__ == "__main__":
    main()
