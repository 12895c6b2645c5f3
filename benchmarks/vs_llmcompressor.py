"""gransearch against llm-compressor: the same model, calibration windows, scheme and test text.

    bash scripts/llmcompressor_env.sh    # .venv-llmc: llm-compressor (it pins transformers and compressed-tensors) + gransearch
    .venv-llmc/bin/python benchmarks/vs_llmcompressor.py [--rows rtn,gptq,gptq-actorder,awq] [--n-calib 128]
                                                        [--out docs/data/interop/llmcompressor.json]
    .venv/bin/python benchmarks/vs_llmcompressor.py --print      # the tables of the committed record

Each row quantizes a fresh copy of the packaged SmolLM2-135M twice in one process, once with
llm-compressor's ``oneshot`` and once with ``gs.quantize``, from the same calibration windows (128 x
512 tokens of the wiki-sample train split, seed 0), and measures both with ``gs.perplexity`` on the
whole wiki-sample test split. The scheme is llm-compressor's W4A16 with groups of 64 (SmolLM2's
576-wide inputs do not divide into its preset's 128); every linear of the blocks, ``lm_head`` kept.

* ``rtn``: ``QuantizationModifier`` (min-max observer) against ``method="rtn"``, symmetric;
  ``rtn-channel`` the same per output channel (``w4cs``).
* ``gptq``: ``GPTQModifier(actorder=None)``, whose group parameters always come from the original
  weights (its observer runs before the solve), against ``method="gptq", static_groups=True``.
* ``gptq-actorder``: ``GPTQModifier()`` (its default, ``actorder="static"``) against
  ``act_order=True, static_groups=True``. Both: dampening 0.01 of the mean Hessian diagonal, lazy
  blocks of 128 columns, block by block with each block calibrated on the quantized blocks before it.
* ``awq``: ``AWQModifier()`` then ``QuantizationModifier`` (its documented recipe, W4A16_ASYM, groups
  of 64) against ``method="awq"`` with ``w4g64`` (asymmetric), each with its defaults: llm-compressor
  searches each scaling group's 20 grid points (duo scaling: weight and activation statistics) on
  the block's outputs over all the calibration tokens and does not clip; gransearch searches 20
  points on the outputs over the first 8,192 tokens, then each layer's clip ratio over 512 (the AWQ
  reference's protocol). Codes are not compared, since the two choose different scales. Without a
  GPU, llm-compressor's activation cache skips its memory pinning (:func:`cpu_only_workaround`).

For the symmetric rows the integer levels are compared weight by weight: the share of the 106 M
block weights on which the two tools chose the same level, and the largest difference. The
tools' scales differ in their last bits (gransearch stores float16 scales and rounds them up,
llm-compressor keeps them in the model's float32), which alone moves a few ties. Seconds are each
tool's quantize call in this process (llm-compressor's includes its data pipeline).

Rows are written to ``--out`` as they finish; a run with the same settings skips the rows there.
The record's ``commit`` and ``versions`` are those of its last run (each row made since this
script kept one has its own ``commit``). ``--control`` adds to the GPTQ rows gransearch against
itself: the same call again, and with the calibration windows in reverse order, which changes
nothing but float32 summation order, to show the size of the drift rounding noise alone causes;
to the RTN rows, where their levels differ (:func:`rtn_ties`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

# each row's gransearch call: (spec, gs.quantize keywords); llm-compressor's recipe is llmc_recipe(row)
OURS = {"rtn": ("w4g64s", dict(method="rtn")),
        "gptq": ("w4g64s", dict(method="gptq", static_groups=True)),
        "gptq-actorder": ("w4g64s", dict(method="gptq", act_order=True, static_groups=True)),
        "awq": ("w4g64", dict(method="awq")),
        "rtn-channel": ("w4cs", dict(method="rtn"))}
ROWS = tuple(OURS)
GROUP = 64


def commit(root: str | None = None) -> str:
    """The short commit of the checkout at ``root`` (default: this one), ``+dirty`` when its tracked
    files differ from it; ``unknown`` outside git."""
    here = root or os.path.dirname(os.path.abspath(__file__))
    try:
        c = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True,
                               check=True).stdout.strip()
        return c + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def checked_rows(text: str, known) -> list[str]:
    rows = text.split(",")
    if bad := [r for r in rows if r not in known]:
        raise SystemExit(f"unknown rows {bad}: choose from {', '.join(known)}")
    return rows


def reading_args(doc: str, rows, out: str, calib: bool = True):
    """The command line of the scripts that read another tool's checkpoints (read_llmcompressor.py,
    read_gptqmodel.py, read_ct_actorder_group.py): rows, test tokens, calibration windows (where the
    tool calibrates: ``calib``), the record, or only its table."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--rows", default=",".join(rows))
    ap.add_argument("--test-tokens", type=int, default=16384)
    if calib:
        ap.add_argument("--n-calib", type=int, default=32, help="calibration windows of 512 tokens")
    ap.add_argument("--out", default=out)
    ap.add_argument("--print", action="store_true", help="only print the table of --out")
    return ap.parse_args()


def reading_setup(args):
    """``(settings, tokenizer, test ids, calibration windows, perplexity function)`` of those scripts:
    SmolLM2-135M, the first ``--test-tokens`` wiki-sample test tokens, ``--n-calib`` x 512 training
    tokens (seed 0)."""
    import gransearch as gs

    settings = {"model": "smollm2-135m", "test_tokens": args.test_tokens, "n_calib": args.n_calib, "seqlen": 512}
    _, tok = gs.load_model("smollm2-135m")
    test = gs.load_tokens("wiki-sample", tok, "test")[: args.test_tokens]
    calib = gs.sample_windows(gs.load_tokens("wiki-sample", tok, "train"), args.n_calib, 512, seed=0)

    def ppl(model) -> float:
        return gs.perplexity(model, test, seqlen=512, batch_size=4, verbose=False).ppl

    return settings, tok, test, calib, ppl


def import_llmcompressor():
    """llm-compressor's ``oneshot`` (with :func:`cpu_only_workaround` applied), or the way to install it."""
    try:
        from llmcompressor import oneshot
    except ImportError:
        raise SystemExit("llm-compressor is not installed in this Python: run `bash scripts/llmcompressor_env.sh` and use "
                         ".venv-llmc/bin/python (llm-compressor pins its own transformers and compressed-tensors)") from None
    cpu_only_workaround()
    return oneshot


def save_record(out: str, record: dict) -> None:
    """Whole or not at all: a killed run keeps its finished rows."""
    from gransearch._files import atomic_write

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write(out, json.dumps(record, indent=1))


def keep_row(out: str, record: dict, row: str, result: dict) -> None:
    """A finished row into the record, the record saved (a killed run resumes after it), the row printed."""
    record["rows"][row] = result
    save_record(out, record)
    print(f"{row}: {json.dumps(result)}", flush=True)


def read_record(out: str) -> dict:
    with open(out) as fh:
        return json.load(fh)


def open_record(out: str, settings: dict) -> dict:
    """The record in ``out`` to resume when it was made with ``settings``; a new one if there is none."""
    if not os.path.exists(out):
        return {"settings": settings, "rows": {}}
    old = read_record(out)
    if old.get("settings") != settings:
        raise SystemExit(f"{out} holds a run with other settings ({old.get('settings')}): give --out another file")
    return old


def provenance(script: str) -> dict:
    """Where and with what a record's last run was made."""
    import compressed_tensors
    import llmcompressor
    import transformers

    import gransearch as gs

    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}", "commit": commit(),
            "versions": {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                         "transformers": transformers.__version__, "gransearch": gs.__version__},
            "command": f"python benchmarks/{script} " + " ".join(sys.argv[1:])}


def weight_args(symmetric: bool, channel: bool = False) -> dict:
    if channel:
        return {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "channel"}
    return {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": GROUP}


def llmc_recipe(row: str):
    from compressed_tensors.quantization import ActivationOrdering
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    groups = {"group_0": {"targets": ["Linear"], "weights": weight_args(row != "awq", channel=row == "rtn-channel")}}
    if row in ("rtn", "rtn-channel"):
        return QuantizationModifier(config_groups=groups, ignore=["lm_head"])
    if row == "awq":
        return [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    actorder = ActivationOrdering.STATIC if row == "gptq-actorder" else None
    return GPTQModifier(config_groups=groups, ignore=["lm_head"], actorder=actorder, dampening_frac=0.01, block_size=128)


def cpu_only_workaround() -> None:
    """llm-compressor 0.14.0.1's AWQ pins its cached activations (``IntermediatesCache.pin_memory``),
    which raises "Cannot access accelerator device when none is available" on a machine without
    one. Pinning only speeds up copies to a GPU; without a GPU it is skipped here (numerics unchanged)."""
    if torch.cuda.is_available():
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def llmc_levels(model) -> dict[str, torch.Tensor]:
    """Each quantized linear's signed integer levels ``[out, in]``, from its weight and its own scale."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and hasattr(m, "weight_scale") and name != "lm_head":
            s = m.weight_scale.detach().float()
            k = m.weight.shape[1] // s.shape[1]  # columns per scale: the group size, or all of them (per channel)
            s = s.repeat_interleave(k, dim=1)
            zp = m.weight_zero_point.detach().float().repeat_interleave(k, dim=1) if hasattr(m, "weight_zero_point") else 0.0
            out[name] = (torch.round(m.weight.detach().float() / s) + zp).clamp(-8, 7).to(torch.int16)
    return out


def our_levels(model) -> dict[str, torch.Tensor]:
    """The same for gransearch's QuantLinear layers (symmetric: code - 8)."""
    import gransearch as gs

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, gs.QuantLinear):
            qw = m.quantized_weight()
            out[name] = qw.codes.to(torch.int16) - 8
    return out


def agreement(a: dict, b: dict) -> dict:
    if set(a) != set(b):
        raise SystemExit(f"the two tools quantized different layers: {sorted(set(a) ^ set(b))[:4]}")
    same = sum(int((a[n] == b[n]).sum()) for n in a)
    total = sum(a[n].numel() for n in a)
    worst = max(int((a[n] - b[n]).abs().max()) for n in a)
    return {"layers": len(a), "weights": total, "same_level_share": same / total, "max_level_difference": worst}


def control(row: str, calib: torch.Tensor, fresh, ppl) -> dict:
    """gransearch against itself: the row's call again, then with the calibration windows in reverse
    order (the same tokens, so the same first Hessians up to float32 summation order), to show how far
    two runs of one correct GPTQ drift apart on rounding noise alone."""
    import gransearch as gs

    spec, kw = OURS[row]
    runs = []
    for c in (calib, calib.flip(0)):
        model = fresh()
        gs.quantize(model, spec, c, objective=False, verbose=False, **kw)
        runs.append((ppl(model), our_levels(model)))
        del model
    (again, a), (rev, b) = runs
    return {"ppl_again": again, "ppl_reversed": rev, "ppl_relative_difference": rev / again - 1, "levels": agreement(a, b)}


def rtn_ties(row: str, fresh, oneshot) -> dict:
    """Where the two RTNs' levels differ: the share of those weights that are their group's most
    negative weight with the group's largest magnitude. That weight sits exactly 7.5 steps below
    zero: llm-compressor's float32 scale rounds it to -8 (half to even), gransearch's float16 scale,
    rounded up, puts it a hair above -7.5 and so at -7. Either level is half a step away."""
    import gransearch as gs

    model = fresh()
    weights = {n: m.weight.detach().float().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    oneshot(model=model, recipe=llmc_recipe(row), pipeline="independent")
    theirs = llmc_levels(model)
    model = fresh()
    spec, kw = OURS[row]
    gs.quantize(model, spec, None, objective=False, verbose=False, **kw)
    ours = our_levels(model)
    differ = at_tie = 0
    for n, w in weights.items():
        g = GROUP if row == "rtn" else w.shape[1]
        blocks = w.reshape(w.shape[0], -1, g)
        amax = blocks.abs().amax(-1, keepdim=True)
        tie = (blocks == -amax).reshape_as(w)
        d = ours[n] != theirs[n]
        differ += int(d.sum())
        at_tie += int((d & tie).sum())
    return {"levels_differing": differ, "of_them_at_the_negative_extreme": at_tie, "share": at_tie / max(1, differ)}


def calib_loader(calib: torch.Tensor):
    from torch.utils.data import DataLoader

    rows = [{"input_ids": w.unsqueeze(0), "attention_mask": torch.ones(1, w.numel(), dtype=torch.long)} for w in calib]
    return DataLoader(rows, batch_size=None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--test-tokens", type=int, default=None, help="only the first N test tokens (a smoke run); default the whole split")
    ap.add_argument("--out", default="docs/data/interop/llmcompressor.json")
    ap.add_argument("--control", action="store_true",
                    help="for the finished rows: GPTQ against itself with the calibration windows reversed; where the RTNs differ")
    ap.add_argument("--print", action="store_true", help="only print the table of --out (no llm-compressor needed)")
    args = ap.parse_args()
    if args.print:
        return print_table(read_record(args.out))
    rows = checked_rows(args.rows, ROWS)
    oneshot = import_llmcompressor()

    import gransearch as gs

    settings = {"model": args.model, "n_calib": args.n_calib, "seqlen": args.seqlen, "test_tokens": args.test_tokens, "group_size": GROUP}
    record = open_record(args.out, settings)
    record.update(provenance("vs_llmcompressor.py"))

    def save():
        save_record(args.out, record)

    _, tok = gs.load_model(args.model)
    calib = gs.sample_windows(gs.load_tokens("wiki-sample", tok, "train"), args.n_calib, args.seqlen, seed=0)
    test = gs.load_tokens("wiki-sample", tok, "test")
    if args.test_tokens:
        test = test[: args.test_tokens]

    def ppl(model) -> float:
        return gs.perplexity(model, test, seqlen=args.seqlen, batch_size=4, verbose=False).ppl

    if "float_ppl" not in record:
        record["float_ppl"] = ppl(gs.load_model(args.model)[0])
        save()
    print(f"float: {record['float_ppl']:.4f}", flush=True)
    for row in rows:
        if row in record["rows"]:
            if args.control and "control" not in record["rows"][row] and row != "awq":
                fresh = lambda: gs.load_model(args.model)[0]  # noqa: E731
                record["rows"][row]["control"] = (rtn_ties(row, fresh, oneshot) if row.startswith("rtn")
                                                  else control(row, calib, fresh, ppl))
                save()
                print(f"{row} control: {json.dumps(record['rows'][row]['control'])}", flush=True)
            else:
                print(f"{row}: done already", flush=True)
            continue
        model, _ = gs.load_model(args.model)
        t0 = time.perf_counter()
        rtn = row.startswith("rtn")
        oneshot(model=model, dataset=None if rtn else calib_loader(calib), recipe=llmc_recipe(row),
                num_calibration_samples=args.n_calib, max_seq_length=args.seqlen, pipeline="independent" if rtn else "sequential")
        t_llmc = time.perf_counter() - t0
        theirs = {"seconds": round(t_llmc, 1), "ppl": ppl(model)}
        levels = llmc_levels(model) if row != "awq" else None
        del model
        spec, kw = OURS[row]
        model, _ = gs.load_model(args.model)
        t0 = time.perf_counter()
        gs.quantize(model, spec, calib, objective=False, verbose=False, **kw)
        t_ours = time.perf_counter() - t0
        ours = {"seconds": round(t_ours, 1), "ppl": ppl(model), "spec": spec, **kw}
        out = {"llmcompressor": theirs, "gransearch": ours, "ppl_relative_difference": ours["ppl"] / theirs["ppl"] - 1,
               "commit": record["commit"]}
        if levels is not None:
            out["levels"] = agreement(levels, our_levels(model))
        del model
        keep_row(args.out, record, row, out)
    print_table(record)


def print_table(record: dict) -> None:
    print(f"\nfloat: test ppl {record['float_ppl']:.4f}\n")
    print("| row | llm-compressor ppl | gransearch ppl | difference | same level | max level diff | llm-compressor s | gransearch s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row, r in record["rows"].items():
        lv = r.get("levels") or {}
        share = f"{100 * lv['same_level_share']:.2f}%" if lv else "-"
        print(f"| {row} | {r['llmcompressor']['ppl']:.4f} | {r['gransearch']['ppl']:.4f} | {100 * r['ppl_relative_difference']:+.2f}% | {share} | "
              f"{lv.get('max_level_difference', '-')} | {r['llmcompressor']['seconds']:.1f} | {r['gransearch']['seconds']:.1f} |")
    ties = {row: r["control"] for row, r in record["rows"].items() if "share" in r.get("control", {})}
    for row, c in ties.items():
        print(f"\n{row}: {c['levels_differing']:,} levels differ; {c['of_them_at_the_negative_extreme']:,} of them "
              f"({100 * c['share']:.1f}%) are their group's most negative weight at its largest magnitude (--control)")
    controls = {row: r["control"] for row, r in record["rows"].items() if "ppl_again" in r.get("control", {})}
    if controls:
        print("\ngransearch against itself, the calibration windows reversed (--control):\n")
        print("| row | gransearch ppl (again) | windows reversed | difference | same level | max level diff |")
        print("|---|---:|---:|---:|---:|---:|")
        for row, c in controls.items():
            print(f"| {row} | {c['ppl_again']:.4f} | {c['ppl_reversed']:.4f} | {100 * c['ppl_relative_difference']:+.2f}% | "
                  f"{100 * c['levels']['same_level_share']:.2f}% | {c['levels']['max_level_difference']} |")


if __name__ == "__main__":
    main()
