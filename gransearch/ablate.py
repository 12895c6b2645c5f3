"""Ablations and outlier diagnostics: measure how much granularity matters, where and why.

* :func:`ablate_weights`: methods x granularities x bit widths on one model. The model is
  calibrated **once** and every layer is quantized from those statistics (the candidate bank of
  :func:`gransearch.bank.build_bank`: each layer sees the unquantized model's inputs); each
  configuration is then assembled and its perplexity measured. This is the one-shot protocol of the
  search, cheaper than sequential :func:`gransearch.quantize` (which re-computes every block's
  inputs through the already quantized blocks); ``docs/granularity.md`` compares the two.
* :func:`ablate_activations`: W8A8 with activations per tensor / token / channel, static or
  dynamic; SmoothQuant over its migration strength; LLM.int8()-style outlier columns over
  thresholds; and per-tensor activation quantization on one input kind at a time (which layers are
  responsible for the damage).

Outlier diagnostics per layer (:func:`gransearch.diagnostics.diagnose`) live in :mod:`gransearch.diagnostics`.

Every ablation appends one CSV row per configuration and skips the rows its CSV already holds, so
an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import copy
import logging
from typing import Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import get_module, input_kinds, layer_kind, linear_weight, model_linears
from .calibrate import calibrate
from .cost import layer_nbytes
from .data import tokens_sha256
from .errors import check_float_model
from .evaluate import perplexity, windows
from .fold import smoothquant
from .plan import LayerPlan, plan_nbytes, weights_fingerprint
from .methods import METHODS
from .quantize import outlier_share, quantize, set_act_quant
from .bank import build_bank
from .spec import ActSpec, QuantSpec, as_granularity
from .report import ACT_FIELDS, WEIGHT_FIELDS, act_text, activations_markdown, append_row, plot_activations, plot_weights, read_rows, weights_markdown
from .study import bind_file

log = logging.getLogger(__name__)

__all__ = ["ablate_weights", "ablate_activations", "WEIGHT_FIELDS", "ACT_FIELDS",
           "read_rows", "weights_markdown", "activations_markdown", "plot_weights", "plot_activations"]



def _run_record(kind: str, model, calib, eval_ids, seqlen, max_windows, stats=None) -> dict:
    """What an ablation's rows depend on: the weights, the calibration and the evaluated windows."""
    if stats is not None:
        calib_id = "given stats"
    elif calib is None:
        calib_id = None
    else:
        calib_id = tokens_sha256(calib)
    return {"kind": kind, "weights": weights_fingerprint(model), "calib_sha256": calib_id,
            "eval_sha256": tokens_sha256(windows(eval_ids, seqlen, max_windows)), "seqlen": seqlen, "max_windows": max_windows}


def _eval(model, ids, seqlen, max_windows, batch_size):
    return perplexity(model, ids, seqlen=seqlen, batch_size=batch_size, max_windows=max_windows, verbose=False)


# ------------------------------------------------------------------------------------------------
# weights


@torch.no_grad()
def ablate_weights(
    model: nn.Module,
    calib,
    eval_ids: torch.Tensor,
    *,
    methods: Sequence[str] = METHODS,
    bits: Sequence[int] = (8, 4, 3),
    granularities: Sequence = ("tensor", "channel", 128, 64, 32),
    out: Optional[str] = None,
    model_name: str = "model",
    seqlen: int = 512,
    max_windows: Optional[int] = None,
    batch_size: int = 4,
    stats: Optional[dict] = None,
    device=None,
    verbose: bool = True,
) -> list[dict]:
    """Perplexity of every (method, bits, granularity) on ``eval_ids``; one CSV row each.

    Calibrates once (or uses ``stats``), then, one bit width at a time, builds the candidate bank
    of every missing configuration and evaluates each assembled model. A granularity whose group
    size does not divide every linear layer's input is skipped (logged). Rows already in ``out``
    are not recomputed. Returns every row (old and new), the unquantized model first
    (``method="fp"``). GPTQ rows are plain GPTQ (no act-order), one-shot on unquantized inputs.
    """
    # long on purpose: resume bookkeeping, one calibration and one bank per bit width in a single loop
    check_float_model(model, "a weight ablation")
    bad = set(methods) - set(METHODS)
    if bad:
        raise ValueError(f"unknown methods {sorted(bad)}: use any of {METHODS}")
    refs = model_linears(model)
    if not refs:
        raise ValueError("the model has no quantizable linear layers")
    n_weights = sum(r.shape[0] * r.shape[1] for r in refs)
    if out:
        bind_file(out, _run_record("weights", model, calib, eval_ids, seqlen, max_windows, stats), "weight-ablation rows")
    done = read_rows(out, ("method", "spec"))

    def record(row):
        row = {k: str(v) for k, v in row.items()}  # as read back from the CSV
        append_row(out, WEIGHT_FIELDS, row)
        done[(row["method"], row["spec"])] = row

    if ("fp", "fp") not in done:
        r = _eval(model, eval_ids, seqlen, max_windows, batch_size)
        record({"model": model_name, "method": "fp", "spec": "fp", "bits": "", "granularity": "", "ppl": f"{r.ppl:.4f}",
                "delta_pct": "0.00", "bits_per_weight": f"{8 * next(model.parameters()).element_size():g}",
                "model_bytes": plan_nbytes(model, {}), "linear_bytes": "", "eval_tokens": r.n_tokens,
                "eval_seconds": f"{r.seconds:.1f}"})
    base = float(done[("fp", "fp")]["ppl"])

    grans = []
    for g in granularities:
        gran = as_granularity(g)
        misfit = sorted({r.shape[1] for r in refs if not gran.fits(r.shape[1])})
        if misfit:
            log.warning("skipping %s: its groups do not divide input width(s) %s", gran.name, misfit)
            continue
        grans.append(gran)
    todo = [(b, g, m) for b in bits for g in grans for m in methods if (m, str(QuantSpec(int(b), g))) not in done]
    bar = tqdm(total=len(todo), desc="ablate weights", disable=not verbose)
    if todo and stats is None:
        stats = calibrate(model, calib, device=device, verbose=verbose)
    work = copy.deepcopy(model).eval() if todo else None
    mods = {r.name: get_module(work, r.name) for r in refs} if todo else {}
    for b in bits:
        mine = [(g, m) for bb, g, m in todo if bb == b]
        if not mine:
            continue
        need = sorted({m for _, m in mine}, key=METHODS.index)
        # plain GPTQ (no act-order), as the published grid was measured; no Fisher (no knapsack here)
        bank = build_bank(model, None, need, [int(b)], sorted({g for g, _ in mine}, key=str), stats=stats, device=device,
                          act_order=False, fisher_windows=0, verbose=verbose)
        for g, m in mine:
            spec = QuantSpec(int(b), g)
            key = f"{m}:{spec}"
            for i, name in enumerate(bank.layers):
                linear_weight(mods[name]).copy_(bank.entries[i][bank.index(i, key)].effective_weight())
            r = _eval(work, eval_ids, seqlen, max_windows, batch_size)
            lin_bytes = sum(layer_nbytes(ref.shape, spec) for ref in refs)
            total = plan_nbytes(model, {ref.name: LayerPlan(m, spec) for ref in refs})
            record({"model": model_name, "method": m, "spec": str(spec), "bits": int(b), "granularity": g.name,
                    "ppl": f"{r.ppl:.4f}", "delta_pct": f"{100 * (r.ppl / base - 1):.2f}",
                    "bits_per_weight": f"{8 * lin_bytes / n_weights:.3f}", "model_bytes": total,
                    "linear_bytes": lin_bytes, "eval_tokens": r.n_tokens, "eval_seconds": f"{r.seconds:.1f}"})
            bar.update(1)
            bar.set_postfix(last=f"{m} {spec} {r.ppl:.2f}")
        del bank
    bar.close()
    keys = [("fp", "fp")] + [(m, str(QuantSpec(int(b), g))) for b in bits for g in grans for m in methods]
    return [done[k] for k in keys if k in done]


# ------------------------------------------------------------------------------------------------
# activations


@torch.no_grad()
def ablate_activations(
    model: nn.Module,
    calib,
    eval_ids: torch.Tensor,
    *,
    weight_spec="w8c",
    act_bits: int = 8,
    alphas: Sequence[float] = (0.25, 0.5, 0.75, 0.9),
    thresholds: Sequence[float] = (6.0, 3.0),
    attribution: bool = True,
    out: Optional[str] = None,
    model_name: str = "model",
    seqlen: int = 512,
    max_windows: Optional[int] = None,
    batch_size: int = 4,
    device=None,
    verbose: bool = True,
) -> list[dict]:
    """W8A8-style activation study; one CSV row per configuration (skipped when already in ``out``).

    Weights are RTN ``weight_spec`` (default per-channel 8-bit) in every row. Configurations:

    * ``W only``: weights quantized, activations in floating point (the reference for the rest);
    * activations per ``tensor`` (static: calibrated ``max|x|``, and dynamic), per ``token``
      (dynamic) and per ``channel`` (static and dynamic; an ideal integer GEMMs cannot use);
    * SmoothQuant with each ``alphas`` value, then per-tensor static and per-token dynamic;
    * LLM.int8()-style decomposition with each of ``thresholds`` (columns with any ``|x|`` above it
      stay in floating point), rest per-token dynamic, with the share of columns kept;
    * ``attribution``: per-tensor static on the inputs of one kind of layer at a time (q/k/v,
      o, gate/up, down), every other layer's activations in floating point.
    """
    # long on purpose: the configuration list is data, read top to bottom with the loop that runs it
    check_float_model(model, "an activation ablation")
    wspec = QuantSpec.parse(weight_spec) if isinstance(weight_spec, str) else weight_spec
    if out:
        rec = {**_run_record("activations", model, calib, eval_ids, seqlen, max_windows), "weight_spec": str(wspec), "act_bits": act_bits}
        bind_file(out, rec, "activation-ablation rows")
    done = read_rows(out, ("config",))
    a = act_bits
    configs: list[tuple[str, str, dict]] = [
        ("W only", "reference", {}),
        (f"A{a} tensor static", "granularity", {"act": ActSpec(a, "tensor", dynamic=False)}),
        (f"A{a} tensor dynamic", "granularity", {"act": ActSpec(a, "tensor", dynamic=True)}),
        (f"A{a} token dynamic", "granularity", {"act": ActSpec(a, "token", dynamic=True)}),
        (f"A{a} channel static", "granularity", {"act": ActSpec(a, "channel", dynamic=False)}),
        (f"A{a} channel dynamic", "granularity", {"act": ActSpec(a, "channel", dynamic=True)}),
    ]
    for al in alphas:
        configs.append((f"SmoothQuant {al:g} + A{a} tensor static", "smoothquant", {"alpha": al, "act": ActSpec(a, "tensor", dynamic=False)}))
        configs.append((f"SmoothQuant {al:g} + A{a} token dynamic", "smoothquant", {"alpha": al, "act": ActSpec(a, "token", dynamic=True)}))
    for t in thresholds:
        configs.append((f"outliers > {t:g} + A{a} token dynamic", "outliers", {"threshold": t, "act": ActSpec(a, "token", True, t)}))
        configs.append((f"outliers > {t:g} + A{a} tensor dynamic", "outliers", {"threshold": t, "act": ActSpec(a, "tensor", True, t)}))
    if attribution:
        for kind, leaves in input_kinds(model).items():
            configs.append((f"A{a} tensor static on {kind} only", "attribution", {"act": ActSpec(a, "tensor", dynamic=False), "only": leaves}))
    todo = [c for c in configs if (c[0],) not in done]
    fp = done.get(("fp",))
    if fp is None:
        r = _eval(model, eval_ids, seqlen, max_windows, batch_size)
        fp = {"model": model_name, "config": "fp", "kind": "reference", "weights": "fp", "act": "fp", "alpha": "", "threshold": "",
              "outlier_share": "", "ppl": f"{r.ppl:.4f}", "delta_pct": "0.00", "eval_tokens": str(r.n_tokens), "eval_seconds": f"{r.seconds:.1f}"}
        append_row(out, ACT_FIELDS, fp)
        done[("fp",)] = fp
    base = float(fp["ppl"])
    stats = None  # statistics of the unquantized model: SmoothQuant's input, static scales
    plain = None  # the weight-quantized model without smoothing, built once
    bar = tqdm(todo, desc="ablate activations", disable=not verbose)
    for name, kind, opt in bar:
        act = opt.get("act")
        if stats is None and (kind == "smoothquant" or (act is not None and not act.dynamic)):
            stats = calibrate(model, calib, hessian=False, device=device, verbose=False)
        if kind == "smoothquant":
            m = copy.deepcopy(model)
            smoothquant(m, stats, opt["alpha"])
            st = calibrate(m, calib, hessian=False, device=device, verbose=False) if not act.dynamic else None
            quantize(m, wspec, calib, method="rtn", objective=False, verbose=False)
        else:
            if plain is None:
                plain = copy.deepcopy(model)
                quantize(plain, wspec, calib, method="rtn", objective=False, verbose=False)
            m, st = plain, stats
        set_act_quant(m, None)
        if act is not None:
            leaves = opt.get("only")
            set_act_quant(m, act, st, only=None if leaves is None else (lambda n: layer_kind(n) in leaves))
        r = _eval(m, eval_ids, seqlen, max_windows, batch_size)
        share = outlier_share(m) if opt.get("threshold") is not None else None
        set_act_quant(m, None)
        row = {"model": model_name, "config": name, "kind": kind, "weights": f"rtn {wspec}", "act": "fp" if act is None else act_text(act),
               "alpha": opt.get("alpha", ""), "threshold": opt.get("threshold", ""),
               "outlier_share": "" if share is None else f"{share:.5f}", "ppl": f"{r.ppl:.4f}",
               "delta_pct": f"{100 * (r.ppl / base - 1):.2f}", "eval_tokens": r.n_tokens, "eval_seconds": f"{r.seconds:.1f}"}
        row = {k: str(v) for k, v in row.items()}
        append_row(out, ACT_FIELDS, row)
        done[(name,)] = row
        bar.set_postfix(last=f"{name}: {r.ppl:.2f}")
    return [done[k] for k in [("fp",)] + [(c[0],) for c in configs] if k in done]
