"""Command line: ``gransearch eval | quantize | optimize | worker | ablate | diagnose``.

Each subcommand mirrors a Python function: ``eval`` -> :func:`gransearch.perplexity`,
``quantize`` -> :func:`gransearch.quantize`, ``optimize`` -> :func:`gransearch.optimize`, ``worker``
-> ``optimize`` joining an existing study, ``ablate weights`` / ``ablate activations`` ->
:func:`gransearch.ablate_weights` / :func:`gransearch.ablate_activations`, ``diagnose`` ->
:func:`gransearch.diagnose`.
"""

from __future__ import annotations

import argparse
import json
import os
import logging
import sys
import time

from . import runs, search


def _argtype(name: str, fn, *extra):
    """An argparse type from a check in :mod:`gransearch.runs` (its message becomes argparse's)."""

    def parse(text: str):
        try:
            return fn(text, *extra)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = name
    return parse


def _int_at_least(lo: int):
    return _argtype(f"integer >= {lo}", runs.int_at_least, lo)


_positive_float = _argtype("number > 0", runs.positive_float)
_awq_rank = _argtype("awq rank", runs.awq_rank)
_BITS = _argtype("bit widths", runs.text_list, *runs.LIST_CHECKS["bits"])
_GRANS = _argtype("granularities", runs.text_list, *runs.LIST_CHECKS["grans"])
_METHODS = _argtype("methods", runs.text_list, *runs.LIST_CHECKS["methods"])
_csv_list, _gran = runs.csv_list, runs.gran_token


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="packaged name, .gguf file, local dir or hub id (default: smollm2-135m)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default: float32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code (off by default)")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="wiki-sample", help="wiki-sample | news-sample | wikitext2 | c4 | path.txt")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p.add_argument("--seqlen", type=_int_at_least(2), default=512)
    p.add_argument("--batch-size", type=_int_at_least(1), default=4)
    p.add_argument("--max-windows", type=_int_at_least(1), default=None, help="evaluate only the first N windows")


def _emit(result: dict, as_json: bool) -> None:
    """Print a result as one JSON line or as aligned ``key: value`` lines."""
    if as_json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>18}: {v}")


def _device(arg):
    import torch

    from gransearch.errors import check_device

    if arg:
        check_device(arg)  # a clear error for --device cuda without CUDA
        return arg
    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_eval(args) -> int:
    import gransearch as gs

    t0 = time.perf_counter()
    gs.data.check_text_name(args.data)
    if args.llamacpp and gs.models.gguf_source(args.model) is None:
        raise ValueError(f"--llamacpp scores a GGUF file: {args.model!r} is not one (give a .gguf path or a packaged model)")
    if args.reference and not (args.llamacpp and str(args.reference).endswith(".gguf") and os.path.exists(args.reference)):
        raise ValueError(f"--reference takes the unquantized model's .gguf file, with --llamacpp; {args.reference!r} is not one "
                         "(write it with: gransearch quantize ... or gs.save_gguf(model, 'f32.gguf', embd_type='F32'))")
    mode = "in memory" if args.llamacpp else _quantize_mode(args)
    if mode.startswith("from disk"):
        res, kl = _eval_from_disk(args, mode), None
    else:
        res, kl = _eval_in_memory(args)
    out = {
        "model": args.model,
        "engine": "llama.cpp" if args.llamacpp else "torch",
        "data": f"{args.data}:{args.split}",
        "seqlen": args.seqlen,
        "perplexity": round(res.ppl, 4),
        "tokens_evaluated": res.n_tokens,
        "windows": res.n_windows,
        "eval_seconds": round(res.seconds, 1),
        "tokens_per_second": round(res.n_windows * res.seqlen / res.seconds, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    if mode.startswith("from disk"):
        out["mode"] = "from disk, block by block"
    if args.reference:
        out.update({"reference": args.reference, "kl_divergence": round(kl.kl, 6), "kl_divergence_se": round(kl.kl_se, 6),
                    "same_top_token": round(kl.top1, 4), "reference_perplexity": round(kl.ref_ppl, 4)})
    _emit(out, args.json)
    return 0


def cmd_quantize(args) -> int:

    import gransearch as gs

    t0 = time.perf_counter()
    gs.data.check_text_name(args.data)
    plan = gs.QuantPlan.load(args.plan) if args.plan else None
    if plan is None:
        gs.spec.parse_spec(args.spec)
    dev = _device(args.device)
    mode = _quantize_mode(args)
    print(f"gransearch quantize: {mode}", file=sys.stderr)
    if mode != "in memory":
        return _quantize_from_disk(args, plan, dev, t0)
    model, tok = gs.load_model(args.model, dtype=args.dtype, device=dev, trust_remote_code=args.trust_remote_code)
    if plan is not None:
        plan.check(model)
    calib = gs.sample_windows(gs.load_tokens(args.data, tok, "train"), args.n_calib, args.calib_seqlen, seed=args.seed)
    test = gs.load_tokens(args.data, tok, args.split)
    summary = {"model": args.model, "data": f"{args.data}:{args.split}", "spec": args.spec if plan is None else f"plan {args.plan}",
               "method": args.method if plan is None else "plan",
               "calibration": f"{args.n_calib} x {args.calib_seqlen} tokens of {args.data}:train, seed {args.seed}",
               "act_order": args.act_order, "static_groups": args.static_groups}
    if not args.skip_fp_eval:
        fp = gs.perplexity(model, test, seqlen=args.seqlen, batch_size=args.batch_size, max_windows=args.max_windows, verbose=not args.quiet)
        summary["ppl_fp"] = round(fp.ppl, 4)
    clip = args.clip if args.clip in (None, "search") else float(args.clip)
    if args.save_gguf:  # measure the model llama.cpp will run: the embedding as the GGUF stores it (Q8_0)
        from gransearch.export.gguf import round_embeddings

        round_embeddings(model, "Q8_0")
    res = gs.quantize(model, args.spec if plan is None else plan, calib, method=args.method, damp=args.damp, act_order=args.act_order,
                      static_groups=args.static_groups, clip=clip, awq_tokens=args.awq_tokens, device=dev, verbose=not args.quiet)
    q = gs.perplexity(model, test, seqlen=args.seqlen, batch_size=args.batch_size, max_windows=args.max_windows, verbose=not args.quiet)
    n_w = sum(r.shape[0] * r.shape[1] for r in res.records)
    summary.update({"ppl_quantized": round(q.ppl, 4), "tokens_evaluated": q.n_tokens, "linear_bytes": res.nbytes,
                    "bits_per_weight": round(8 * res.nbytes / n_w, 4), "quantize_seconds": round(res.seconds, 1),
                    "total_seconds": round(time.perf_counter() - t0, 1)})
    if "ppl_fp" in summary:
        summary["ppl_change_pct"] = round(100 * (q.ppl / summary["ppl_fp"] - 1), 2)
    if args.save:
        saved = gs.save_quantized(model, args.save, dtype=args.save_dtype, tokenizer=tok)
        summary["saved"] = _saved_summary(saved)
    if args.save_gguf:
        summary["saved_gguf"] = _save_gguf(model, args, test, tok)
    return _quantize_outputs(args, summary, res.records)


def _quantize_outputs(args, summary: dict, records) -> int:
    """``--out``'s summary.json and layers.json, then the summary printed."""
    import os

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
        with open(os.path.join(args.out, "layers.json"), "w") as fh:
            json.dump([r.to_dict() for r in records], fh, indent=1)
    _emit(summary, args.json)
    return 0


def _eval_in_memory(args):
    """``(perplexity, KL divergence or None)`` of the model loaded whole, by torch or llama.cpp."""
    import gransearch as gs

    model, tok = gs.load_model(args.model, dtype=args.dtype, device=_device(args.device), trust_remote_code=args.trust_remote_code)
    ids = gs.load_tokens(args.data, tok, args.split)
    if not args.llamacpp:
        return gs.perplexity(model, ids, seqlen=args.seqlen, batch_size=args.batch_size, max_windows=args.max_windows,
                             verbose=not args.quiet), None
    from gransearch import llamacpp

    del model
    kl = None
    if args.reference:
        kl = llamacpp.kl_divergence(gs.models.gguf_source(args.model), args.reference, ids, seqlen=args.seqlen,
                                    max_windows=args.max_windows, verbose=not args.quiet)
    res = llamacpp.perplexity(gs.models.gguf_source(args.model), ids, seqlen=args.seqlen, max_windows=args.max_windows,
                              verbose=not args.quiet)
    return res, kl


def _eval_from_disk(args, mode: str):
    """The perplexity of a model folder (float, or a weight-only compressed-tensors checkpoint: gransearch's
    or llm-compressor's) read one block at a time (gs.offload.perplexity)."""
    import gransearch as gs

    dm, tok = gs.offload.open_folder(args.model, "evaluating", args.dtype, args.trust_remote_code)
    if not args.quiet:
        print(f"eval: {mode}", file=sys.stderr)
    ids = gs.load_tokens(args.data, tok, args.split)
    return gs.offload.perplexity(dm, ids, seqlen=args.seqlen, batch_size=args.batch_size, max_windows=args.max_windows,
                                 device=_device(args.device), verbose=not args.quiet)


def _quantize_mode(args) -> str:
    """``from disk, block by block`` when asked (``--from-disk``) or when the model's float32 weights
    (a local folder's, or a hub id's as the hub lists them) would take more than half the memory
    available now; else ``in memory``."""
    import os

    from gransearch.models import is_hub_id

    if args.from_disk:
        if not (os.path.isdir(args.model) or is_hub_id(args.model)):
            raise ValueError(f"--from-disk reads a model folder (config.json + safetensors) or a hub id's snapshot; "
                             f"{args.model!r} is neither")
        return "from disk, block by block (--from-disk)"
    need = _float32_nbytes(args.model)
    if need is None:
        return "in memory"
    avail = _available_memory()
    if avail is not None and need > avail / 2:
        return f"from disk, block by block (its float32 weights, {need / 1e9:.1f} GB, exceed half the {avail / 1e9:.1f} GB available)"
    return "in memory"


def _float32_nbytes(model: str):
    """Bytes of ``model``'s float weights in float32: from a local folder's safetensors headers, or
    from the hub's listing of a hub id's safetensors (nothing downloaded); None when unknown."""
    import os

    from gransearch.models import is_hub_id
    from gransearch.offload import float32_nbytes

    if os.path.isdir(model):
        try:
            return float32_nbytes(model)
        except (FileNotFoundError, ValueError):
            return None
    if not is_hub_id(model):
        return None
    try:
        import huggingface_hub

        meta = huggingface_hub.get_safetensors_metadata(model)
        return 4 * sum(n for dtype, n in meta.parameter_count.items() if dtype in ("F32", "F16", "BF16"))
    except Exception:  # offline, or no safetensors listing: the model is loaded whole as asked
        return None


def _available_memory():
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _quantize_from_disk(args, plan, dev, t0) -> int:
    """The model folder quantized block by block and written to ``--save`` as it goes (never whole in memory)."""
    import gransearch as gs

    if not args.save:
        raise ValueError("quantizing from disk writes the model as it goes: give --save DIR")
    if args.save_gguf:
        raise ValueError("--save-gguf needs the model in memory; quantize from disk writes compressed-tensors (--save)")
    dm, tok = gs.offload.open_folder(args.model, "quantizing", args.dtype, args.trust_remote_code)
    if plan is not None:
        plan.check(dm.model)
    calib = gs.sample_windows(gs.load_tokens(args.data, tok, "train"), args.n_calib, args.calib_seqlen, seed=args.seed)
    clip = args.clip if args.clip in (None, "search") else float(args.clip)
    res = gs.quantize(dm, args.spec if plan is None else plan, calib, method=args.method, damp=args.damp, act_order=args.act_order,
                      static_groups=args.static_groups, clip=clip, awq_tokens=args.awq_tokens, device=dev, save=args.save,
                      save_dtype=args.save_dtype, verbose=not args.quiet)
    n_w = sum(r.shape[0] * r.shape[1] for r in res.records)
    summary = {"model": args.model, "mode": res.mode, "spec": args.spec if plan is None else f"plan {args.plan}",
               "method": args.method if plan is None else "plan",
               "calibration": f"{args.n_calib} x {args.calib_seqlen} tokens of {args.data}:train, seed {args.seed}",
               "linear_bytes": res.nbytes, "bits_per_weight": round(8 * res.nbytes / n_w, 4), "quantize_seconds": round(res.seconds, 1),
               "total_seconds": round(time.perf_counter() - t0, 1), "saved": _saved_summary(res.saved),
               "perplexity": f"not measured from disk: gransearch eval --model {args.save}"}
    return _quantize_outputs(args, summary, res.records)


def _save_gguf(model, args, test, tok=None) -> dict:
    """Write ``args.save_gguf`` and, with ``--llamacpp-eval``, score it with llama.cpp on the same windows."""
    from collections import Counter

    import gransearch as gs
    from gransearch.export import gguf as gg

    src = gs.models.gguf_source(args.model)
    saved = gg.save_gguf(model, args.save_gguf, source=src, tokenizer=None if src else tok, verbose=not args.quiet)
    out = {"path": saved.path, "tensor_bytes": saved.tensor_nbytes, "file_bytes": saved.file_nbytes,
           "types": dict(sorted(Counter(saved.types.values()).items()))}
    if getattr(args, "llamacpp_eval", False):
        from gransearch import llamacpp

        r = llamacpp.perplexity(saved.path, test, seqlen=args.seqlen, max_windows=args.max_windows, verbose=not args.quiet)
        out["ppl_llamacpp"] = round(r.ppl, 4)
    return out


def _saved_summary(saved) -> dict:
    return {"folder": saved.folder, "quantized_bytes": saved.quantized_nbytes, "float_bytes": saved.float_nbytes,
            "tensor_bytes": saved.quantized_nbytes + saved.float_nbytes, "file_bytes": saved.file_nbytes, "float_dtype": saved.float_dtype}


def cmd_optimize(args) -> int:
    import os

    import gransearch as gs

    if sum(x is not None for x in (args.budget_gb, args.budget_bytes, args.budget_like)) != 1:
        raise ValueError("give exactly one of --budget-gb, --budget-bytes or --budget-like SPEC")
    if args.budget_like:
        gs.QuantSpec.parse(args.budget_like)
    os.makedirs(args.out, exist_ok=True)
    cfg = {k: getattr(args, k) for k in ("model", "data", "dtype", "n_calib", "calib_seqlen", "seed", "budget_gb", "budget_bytes",
                                         "budget_like", "methods", "bits", "grans", "seqlen", "eval_windows", "batch_size", "act_order",
                                         "profile", "float_dtype", "max_bank_gb", "proxy", "sampler", "awq_rank")}
    cfg["bank_prune"] = "dominated" if args.prune_bank else None
    cfg["device"] = _device(args.device)
    mode = _quantize_mode(args)
    cfg["from_disk"] = mode.startswith("from disk")
    if cfg["from_disk"]:
        if args.save_gguf or args.llamacpp_eval:
            raise ValueError("a search from disk writes compressed-tensors (--save); --save-gguf and --llamacpp-eval need the model in memory")
        if args.proxy != "ppl":
            raise ValueError("a search from disk measures perplexity (--proxy ppl)")
    if not args.quiet:
        print(f"search: {mode}{'; finalists written to ' + os.path.join(args.out, 'finals') if cfg['from_disk'] else ''}",
              file=sys.stderr)
    cfg["bank_dir"] = os.path.abspath(os.path.join(args.out, "bank"))  # kept on disk; a rerun reuses it; workers build it together
    os.makedirs(cfg["bank_dir"], exist_ok=True)
    storage = args.storage or f"sqlite:///{os.path.abspath(os.path.join(args.out, 'study.db'))}"
    model, calib, val, test, budget = runs.setup_search(cfg, args.trust_remote_code)
    study_name = args.study or f"gransearch-{os.path.basename(os.path.abspath(args.out))}"
    if not args.quiet:  # what the bank will take on disk, before any of it is built
        kw = runs.search_kwargs(cfg)
        print(gs.bank.bank_size(getattr(model, "model", model) if cfg["from_disk"] else model, kw["methods"], kw["bits"],
                                kw["granularities"], kw["profile"]).table(top=8), file=sys.stderr)
    # workers read the run configuration from the study: stored once the study is checked, before the first trial
    res = gs.optimize(model, budget_bytes=budget, calib=calib, eval_ids=val, final_ids=None if args.n_final == 0 else test,
                      n_trials=args.trials, timeout=args.timeout, storage=storage, study_name=study_name, n_final=args.n_final,
                      study_attrs={"cli_config": json.dumps(cfg)}, verbose=not args.quiet, **runs.search_kwargs(cfg))
    summary = runs.write_run_folder(args.out, res, budget, storage, study_name)
    shown = ["budget_bytes", "plan_bytes", "proxy_ppl", "final_ppl", "trials", "plan"]
    if args.save or args.save_gguf:  # the best plan, re-quantized once as a user applies it, written as asked
        if cfg["from_disk"]:  # block by block from disk, the checkpoint written as the blocks finish
            saved = gs.quantize(model, res.plan, calib, device=cfg["device"], save=args.save, save_dtype=args.float_dtype,
                                verbose=not args.quiet).saved
        else:
            tok = gs.load_model(cfg["model"], dtype=cfg.get("dtype", "float32"), trust_remote_code=args.trust_remote_code)[1]
            gs.quantize(model, res.plan, calib, device=cfg["device"], objective=False, verbose=not args.quiet)
            saved = args.save and gs.save_quantized(model, args.save, dtype=args.float_dtype, tokenizer=tok,
                                                    profile=None if args.profile == "research" else args.profile)
        if args.save:
            summary["saved"] = _saved_summary(saved)
            shown.append("saved")
        if args.save_gguf:
            summary["saved_gguf"] = _save_gguf(model, args, test, tok)
            shown.append("saved_gguf")
        with open(os.path.join(args.out, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
    print(json.dumps({k: summary[k] for k in shown}, indent=1))
    return 0


def cmd_worker(args) -> int:
    res = runs.join_study(args.storage, args.study, args.trials, device=_device(args.device) if args.device else None, bank_dir=args.bank_dir,
                          trust_remote_code=args.trust_remote_code, verbose=not args.quiet)
    print(json.dumps({"trials": res.n_trials, "best_proxy_ppl": res.proxy_ppl}))
    return 0


def _ablation_setup(args):
    import gransearch as gs

    gs.data.check_text_name(args.data)
    model, tok = gs.load_model(args.model, dtype=args.dtype, device=_device(args.device), trust_remote_code=args.trust_remote_code)
    calib = gs.sample_windows(gs.load_tokens(args.data, tok, "train"), args.n_calib, args.calib_seqlen, seed=args.seed)
    ids = gs.load_tokens(args.data, tok, args.split)
    return model, calib, ids


def cmd_ablate(args) -> int:
    import os

    import gransearch as gs
    from gransearch import ablate

    os.makedirs(args.out, exist_ok=True)
    model, calib, ids = _ablation_setup(args)
    common = dict(model_name=args.model, seqlen=args.seqlen, max_windows=args.max_windows, batch_size=args.batch_size,
                  device=_device(args.device), verbose=not args.quiet)
    if args.what == "weights":
        csv_path = os.path.join(args.out, "weights.csv")
        t0 = time.perf_counter()
        rows = gs.ablate_weights(model, calib, ids, methods=_csv_list(args.methods), bits=_csv_list(args.bits, int),
                                 granularities=_csv_list(args.grans, _gran), out=csv_path, **common)
        table = ablate.weights_markdown(rows)
        ablate.plot_weights(rows, os.path.join(args.out, "weights.png"))
        name = "weights"
    else:
        csv_path = os.path.join(args.out, "activations.csv")
        t0 = time.perf_counter()
        rows = gs.ablate_activations(model, calib, ids, weight_spec=args.weights, act_bits=args.act_bits,
                                     alphas=_csv_list(args.alphas, float), thresholds=_csv_list(args.thresholds, float),
                                     out=csv_path, **common)
        table = ablate.activations_markdown(rows)
        ablate.plot_activations(rows, os.path.join(args.out, "activations.png"))
        name = "activations"
    with open(os.path.join(args.out, f"{name}.md"), "w") as fh:
        fh.write(table)
    print(table)
    print(f"{len(rows)} rows in {csv_path}; this call took {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_diagnose(args) -> int:
    import os

    import gransearch as gs

    os.makedirs(args.out, exist_ok=True)
    model, calib, _ = _ablation_setup(args)
    t0 = time.perf_counter()
    d = gs.diagnose(model, calib, weight_bits=args.weight_bits, act_bits=args.act_bits, device=_device(args.device),
                    verbose=not args.quiet)
    d.to_csv(os.path.join(args.out, "diagnostics.csv"))
    titles = {"a_ratio": f"log10 activation error, {args.act_bits}-bit per-tensor static / per-token dynamic",
              "w_ratio": f"log10 weight error, {args.weight_bits}-bit per-tensor / per-channel",
              "act_outlier_ratio": "log10 activation outlier ratio (largest / median channel max|x|)",
              "act_kurtosis": "log10 activation kurtosis"}
    for metric, title in titles.items():
        d.heatmap(metric, os.path.join(args.out, f"heatmap_{metric}.png"), title)
    lines = [f"medians over blocks, by layer kind ({args.weight_bits}-bit weights, {args.act_bits}-bit activations; "
             "W ratio = per-tensor / per-channel weight error, A ratio = per-tensor static / per-token dynamic activation error):\n",
             "| kind | layers | outlier ratio | act kurtosis | weight kurtosis | W ratio (max) | A err tensor | A err token | A ratio (max) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in d.by_kind():
        lines.append(f"| {k['kind']} | {k['n']} | {k['act_outlier_ratio']:.1f} | {k['act_kurtosis']:.1f} | {k['weight_kurtosis']:.1f} | "
                     f"{k['w_ratio']:.0f} ({k['w_ratio_max']:.0f}) | {k['a_err_tensor']:.2e} | {k['a_err_token']:.2e} | "
                     f"{k['a_ratio']:.0f} ({k['a_ratio_max']:.0f}) |")
    for metric in titles:
        lines.append(f"\nlayers with the largest {metric}:\n")
        lines.append("| layer | outlier ratio | act kurtosis | weight kurtosis | W err tensor | W err channel | A err tensor | A err token |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for x in d.worst(metric, args.top):
            lines.append(f"| {x.name} | {x.act_outlier_ratio:.1f} | {x.act_kurtosis:.1f} | {x.weight_kurtosis:.1f} | {x.w_err_tensor:.2e} | "
                         f"{x.w_err_channel:.2e} | {x.a_err_tensor:.2e} | {x.a_err_token:.2e} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "diagnostics.md"), "w") as fh:
        fh.write(text)
    print(text)
    print(f"{len(d.layers)} layers in {os.path.join(args.out, 'diagnostics.csv')}; {time.perf_counter() - t0:.0f} s")
    return 0


def _add_gguf_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--save-gguf", default=None, metavar="FILE",
                   help="write the quantized model as a GGUF for llama.cpp (layers in Q4_0/Q5_0/Q8_0: w4g32s/w5g32s/w8g32s)")
    p.add_argument("--llamacpp-eval", action="store_true", help="score the --save-gguf file with llama.cpp on the test windows")


def _add_ablation_args(p: argparse.ArgumentParser, n_calib: int, max_windows) -> None:
    _add_model_args(p)
    _add_eval_args(p)
    p.set_defaults(max_windows=max_windows)
    p.add_argument("--n-calib", type=_int_at_least(1), default=n_calib, help=f"calibration windows from the train split (default: {n_calib})")
    p.add_argument("--calib-seqlen", type=_int_at_least(2), default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/data/ablation", help="folder for the CSV, markdown table and plots")
    p.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    # long on purpose: every subcommand's options in one place, in the order --help prints them
    ap = argparse.ArgumentParser(prog="gransearch", description="Measure and search per-layer LLM quantization.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress events")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("eval", help="perplexity of a model on a text split")
    _add_model_args(p)
    _add_eval_args(p)
    p.add_argument("--llamacpp", action="store_true", help="score the GGUF file with llama.cpp (CPU) instead of torch")
    p.add_argument("--reference", default=None, metavar="F32.gguf",
                   help="with --llamacpp: also the KL divergence per token from this (unquantized) GGUF, decoded by llama.cpp")
    p.add_argument("--from-disk", action="store_true",
                   help="read the model folder (or a hub id's snapshot) one block at a time (a float model, or a weight-only "
                        "compressed-tensors checkpoint gransearch or llm-compressor wrote, or a GPTQ one; models larger than "
                        "memory; chosen by itself when its float32 weights exceed half the available memory)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quantize", help="quantize a model (uniform spec) and report perplexity before and after")
    _add_model_args(p)
    _add_eval_args(p)
    p.add_argument("--spec", default="w4g64", help="w<bits>(t|c|g<size>)[s], e.g. w4g64, w3c, w8t, or a K-quant Q2_K..Q6_K "
                   "(--method llamacpp) (default: w4g64)")
    p.add_argument("--method", default="gptq", choices=("rtn", "gptq", "awq", "awq+gptq", "llamacpp"),
                   help="llamacpp: llama.cpp's quantizer with the calibration's importance matrix (ggml types: w4g32s, Q4_K...)")
    p.add_argument("--n-calib", type=_int_at_least(1), default=128, help="calibration windows (default: 128)")
    p.add_argument("--calib-seqlen", type=_int_at_least(2), default=512, help="tokens per calibration window (default: 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plan", default=None, help="a plan.json from 'gransearch optimize' (replaces --spec/--method)")
    p.add_argument("--damp", type=_positive_float, default=None, help="GPTQ dampening, fraction of mean diag(H) (default: 0.01, or the plan's)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: quantize columns by descending Hessian diagonal (default: off, or the plan's)")
    p.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: group parameters from the original weights (default: off, or the plan's)")
    p.add_argument("--clip", default=None, help="RTN/GPTQ weight clip: a ratio in (0, 1] or 'search'")
    p.add_argument("--awq-tokens", type=_int_at_least(1), default=8192, help="calibration tokens for AWQ's scale search")
    p.add_argument("--skip-fp-eval", action="store_true", help="do not evaluate the unquantized model first")
    p.add_argument("--out", default=None, help="folder for summary.json and layers.json")
    p.add_argument("--save", default=None, help="write the quantized model here as a compressed-tensors checkpoint")
    p.add_argument("--save-dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="dtype of the saved floating-point tensors (default: the model's published dtype)")
    p.add_argument("--from-disk", action="store_true",
                   help="read the model folder (or a hub id's snapshot) one block at a time and write --save as blocks finish "
                        "(models larger than memory; chosen by itself when the float32 weights exceed half the available memory)")
    _add_gguf_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("optimize", help="search per-layer method, bits and granularity under a byte budget")
    _add_model_args(p)
    p.add_argument("--data", default="wiki-sample", help="corpus: train split calibrates, validation is the proxy, test the final")
    p.add_argument("--budget-gb", type=_positive_float, default=None, help="whole model as stored, in GB (10^9 bytes)")
    p.add_argument("--budget-bytes", type=_int_at_least(1), default=None)
    p.add_argument("--budget-like", default=None, help="the exact size of a uniform plan with this spec, e.g. w4g64")
    p.add_argument("--trials", type=_int_at_least(1), default=60)
    p.add_argument("--timeout", type=_positive_float, default=None, help="seconds for the trial loop")
    p.add_argument("--methods", type=_METHODS, default="rtn,gptq,awq")
    p.add_argument("--bits", type=_BITS, default="2,3,4,8")
    p.add_argument("--grans", type=_GRANS, default="tensor,channel,32,64,128", help="tensor, channel and group sizes (kept where they divide)")
    p.add_argument("--n-calib", type=_int_at_least(1), default=128)
    p.add_argument("--calib-seqlen", type=_int_at_least(2), default=512)
    p.add_argument("--seqlen", type=_int_at_least(2), default=512, help="evaluation window")
    p.add_argument("--eval-windows", type=_int_at_least(1), default=16, help="validation windows per trial")
    p.add_argument("--batch-size", type=_int_at_least(1), default=4)
    p.add_argument("--n-final", type=_int_at_least(0), default=2, help="best plans re-quantized sequentially and measured on test")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True, help="GPTQ column order (default: on)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite in --out)")
    p.add_argument("--study", default=None)
    p.add_argument("--sampler", default="independent", choices=search.SAMPLERS,
                   help="how TPE draws a trial's knapsack weights: each from its own history (default) or jointly")
    p.add_argument("--out", required=True, help="run folder: plan.json, pareto.csv, pareto.png, summary.json, study.db, bank/")
    p.add_argument("--profile", default="research", choices=("research", "vllm", "vllm-asym", "gguf", "gguf-asym"),
                   help="research: every candidate; vllm: only what vLLM serves and transformers reloads (symmetric 4/8 bits), "
                        "bytes of the compressed-tensors checkpoint; vllm-asym: vllm plus asymmetric 4 bits; gguf: llama.cpp's "
                        "Q4_0/Q5_0/Q8_0 (--bits 4,5,8 --grans 32), bytes of the GGUF's tensors; gguf-asym: gguf plus Q4_1/Q5_1")
    p.add_argument("--proxy", default="ppl", choices=("ppl", "kl"),
                   help="what each trial measures on the validation windows: perplexity, or the KL divergence from the "
                        "unquantized model (steadier on few windows; the final stage still reports test perplexity)")
    p.add_argument("--float-dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="dtype the budget counts (and --save writes) floating-point tensors at (default: as loaded; "
                        "vllm: the model's published dtype)")
    p.add_argument("--save", default=None, help="write the best plan's model here as a compressed-tensors checkpoint")
    p.add_argument("--prune-bank", action="store_true",
                   help="keep only each layer's Pareto front of (bytes, layer objective) in the candidate bank")
    p.add_argument("--max-bank-gb", type=_positive_float, default=None,
                   help="refuse a candidate bank larger than this on disk (its size per candidate is estimated before building)")
    rank = search._BANK_DEFAULTS["awq_rank"]
    p.add_argument("--awq-rank", type=_awq_rank, default=rank,
                   help=f"the bank's AWQ searches measure errors with the top-N eigen-factor of each input Hessian (default {rank}), "
                        "or 'exact': the whole Hessian (no eigendecomposition, more arithmetic; better choices by the layer objective)")
    _add_gguf_args(p)
    p.add_argument("--max-windows", type=_int_at_least(1), default=None, help="test windows --llamacpp-eval scores (default: all)")
    p.add_argument("--from-disk", action="store_true",
                   help="read the model folder (or a hub id's snapshot) one block at a time: the bank, every trial, the finalists "
                        "(written to OUT/finals and measured as written) and --save (models larger than memory; chosen by itself "
                        "when the float32 weights exceed half the available memory)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("ablate", help="ablation grids: weights (methods x granularity x bits) or W8A8 activations")
    asub = p.add_subparsers(dest="what", required=True)
    q = asub.add_parser("weights", help="methods x granularities x bit widths; one calibration shared by the grid")
    _add_ablation_args(q, 128, 40)
    q.add_argument("--methods", type=_METHODS, default="rtn,gptq,awq,awq+gptq")
    q.add_argument("--bits", type=_BITS, default="8,4,3")
    q.add_argument("--grans", type=_GRANS, default="tensor,channel,128,64,32", help="kept where the group size divides every layer")
    q.set_defaults(func=cmd_ablate)
    q = asub.add_parser("activations", help="W8A8: activation granularity, static/dynamic, SmoothQuant, outlier columns")
    _add_ablation_args(q, 32, 40)
    q.add_argument("--weights", default="w8c", help="RTN weight spec of every row (default: w8c)")
    q.add_argument("--act-bits", type=_int_at_least(2), default=8)
    q.add_argument("--alphas", default="0.25,0.5,0.75,0.9", help="SmoothQuant migration strengths")
    q.add_argument("--thresholds", default="6,3", help="LLM.int8()-style outlier thresholds on |x|")
    q.set_defaults(func=cmd_ablate)

    p = sub.add_parser("diagnose", help="per-layer outlier diagnostics and heatmaps")
    _add_ablation_args(p, 32, None)
    p.add_argument("--weight-bits", type=_int_at_least(2), default=8)
    p.add_argument("--act-bits", type=_int_at_least(2), default=8)
    p.add_argument("--top", type=_int_at_least(1), default=5, help="layers listed per metric")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("worker", help="join a running search (same storage and study)")
    p.add_argument("--storage", required=True)
    p.add_argument("--study", required=True)
    p.add_argument("--trials", type=_int_at_least(1), default=None,
                   help="complete or pruned trials of the study to stop at, whoever runs them (default: 20 more than now)")
    p.add_argument("--device", default=None, help="where this worker computes, e.g. cuda:1 (default: the run's device)")
    p.add_argument("--bank-dir", default=None,
                   help="a bank folder of this machine's own (default: the run's, built together with the other workers)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model's own code (never taken from the stored run configuration)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_worker)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError) as exc:  # expected: bad input or state, with a message that says the fix
        print(f"gransearch: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
