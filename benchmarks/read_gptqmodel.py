"""gransearch reading GPTQModel's checkpoints (GPTQ and AWQ): the same weights, the same perplexity.

    bash scripts/gptqmodel_env.sh    # .venv-gptqmodel: GPTQModel 7.3.6 (CPU) + gransearch
    .venv-gptqmodel/bin/python benchmarks/read_gptqmodel.py [--rows asym,sym,w8c,w3g64,v2-asym,desc-act-channel,desc-act-g64,awq-asym,awq-sym]
                                                           [--out docs/data/interop/gptqmodel-read.json]
    .venv/bin/python benchmarks/read_gptqmodel.py --print    # the table of the committed record

Each row quantizes SmolLM2-135M with GPTQModel (``GPTQModel.load`` of the float folder
``gs.load_model`` converts the packaged GGUF to, ``quantize`` on ``--n-calib`` x 512 wiki-sample
training tokens with GPTQModel's CPU torch kernel, ``save``: GPTQ's ``qweight``/``qzeros``/``scales``/``g_idx``
layout, v1 zero points unless the row says v2; AWQ's GEMM layout for the ``awq`` rows). Then, in the
same process:

* ``GPTQModel``: the perplexity of GPTQModel's own loading of the folder (``GPTQModel.load`` on the
  CPU, its torch kernel, in the dtype it saved the model's floats in: bfloat16, to which it also
  rounds the stored float16 scales, so its weights are not quite the file's);
* ``gs.load_quantized``: of gransearch's reading of the folder (``QuantLinear`` layers), in that
  dtype, and in float32;
* ``from disk``: of gransearch's block-by-block reading (``gransearch eval --from-disk``, float32);
* ``weights``: how many of the quantized layers' weights gransearch reads equal GPTQModel's own
  dequantization of the layers it loads in float16 (which keeps the stored scales as they are;
  ``dequantize_weight``, its scales taken as float32 so that neither side rounds). That float16 model's
  perplexity is not measured: float16 matmuls are slow on the CPU.

Rows (GPTQModel's defaults otherwise, its ``act_group_aware`` ordering included where there are
groups): ``asym`` 4-bit asymmetric groups of 64; ``sym`` symmetric; ``w8c`` 8-bit per channel;
``w3g64`` 3-bit asymmetric groups of 64 (codes straddle int32 words); ``v2-asym`` ``asym`` saved in
GPTQModel's v2 zero-point format; ``desc-act-channel`` act-order per channel (its ``g_idx`` is all
zeros, so it reads); ``desc-act-g64`` act-order with groups of 64 (its ``g_idx`` scatters each group's
columns along the row; gransearch reads it with that group index); ``awq-asym`` and ``awq-sym``
GPTQModel's AWQ, 4-bit groups of 64, saved in AutoAWQ's GEMM layout. A row gransearch refuses
records GPTQModel's perplexity and gransearch's message.
Groups of 64, not 128: SmolLM2's 576-wide inputs do not divide into 128. Not w4g32: the packaged
model was stored as Q4_1, which flatters groups of 32. The test text is the first ``--test-tokens``
tokens of the wiki-sample test split: the claim is equality, not a perplexity level.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from eval_speed import machine  # same folder
from vs_llmcompressor import checked_rows, commit, keep_row, open_record, read_record, reading_args, reading_setup

ROWS = {
    "asym": dict(bits=4, group_size=64, sym=False),
    "sym": dict(bits=4, group_size=64, sym=True),
    "w8c": dict(bits=8, group_size=-1, sym=True, act_group_aware=False),  # GPTQModel's default ordering needs groups
    "w3g64": dict(bits=3, group_size=64, sym=False),
    "v2-asym": dict(bits=4, group_size=64, sym=False, format="gptq_v2"),
    "desc-act-channel": dict(bits=4, group_size=-1, sym=True, desc_act=True, act_group_aware=False),
    "desc-act-g64": dict(bits=4, group_size=64, sym=True, desc_act=True),
    "awq-asym": dict(method="awq", format="gemm", bits=4, group_size=64, sym=False),
    "awq-sym": dict(method="awq", format="gemm", bits=4, group_size=64, sym=True),
}


def import_gptqmodel():
    """The ``gptqmodel`` module, or the way to install it. GPTQModel 7.3 imports torchvision at import
    time for one vision model's preprocessing (InternVL), and PyPI's torchvision wheels are CUDA
    builds that do not load against a CPU torch: that import gets a stand-in module holding the one
    name it takes, after transformers has looked for torchvision (and found none), never called here."""
    import enum
    import types

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, (os.cpu_count() or 1) // 2)))  # its loader pool needs 2
    import transformers.image_utils  # noqa: F401  decides torchvision's absence before the stand-in exists

    if "torchvision" not in sys.modules:
        tv, tr, fn = (types.ModuleType(n) for n in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"))
        fn.InterpolationMode = enum.Enum("InterpolationMode", {"BICUBIC": "bicubic"})
        tv.transforms, tr.functional = tr, fn
        sys.modules.update({"torchvision": tv, "torchvision.transforms": tr, "torchvision.transforms.functional": fn})
    try:
        import gptqmodel
        from gptqmodel.looper import loop_processor
    except ImportError:
        raise SystemExit("GPTQModel is not installed in this Python: run `bash scripts/gptqmodel_env.sh` and use "
                         ".venv-gptqmodel/bin/python") from None
    # its per-layer logs go to ./logs by default (the checkout): a temporary folder instead
    loop_processor._PROJECT_LOG_DIR = Path(tempfile.mkdtemp(prefix="gptqmodel-logs-"))
    return gptqmodel


def provenance() -> dict:
    import gptqmodel
    import transformers

    import gransearch as gs

    return {"machine": machine(), "commit": commit(),
            "versions": {"gptqmodel": gptqmodel.__version__, "transformers": transformers.__version__, "gransearch": gs.__version__},
            "command": "python benchmarks/read_gptqmodel.py " + " ".join(sys.argv[1:])}


def their_weights(model) -> dict[str, torch.Tensor]:
    """GPTQModel's dequantization of every quantized layer, ``[out, in]`` float32 (an AWQ layer's
    by GPTQModel's ``dequantize_gemm``, what its torch kernel multiplies by)."""
    from gptqmodel.nn_modules.qlinear import AWQuantLinear, BaseQuantLinear
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, AWQuantLinear):
            out[name] = dequantize_gemm(m.qweight, m.qzeros, m.scales.float(), m.bits, m.group_size).t().float()
        elif isinstance(m, BaseQuantLinear):
            scales = m.scales
            m.scales = scales.float()
            try:
                out[name] = m.dequantize_weight().t().float()
            finally:
                m.scales = scales
    return out


def their_scales(model) -> set:
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return {m.scales.dtype for m in model.modules() if isinstance(m, BaseQuantLinear)}


def same_weights(ours, theirs: dict[str, torch.Tensor]) -> dict:
    import gransearch as gs

    layers = same = total = 0
    for name, m in ours.named_modules():
        if isinstance(m, gs.QuantLinear):
            a = m.quantized_weight().dequantize(torch.float32)
            b = theirs[name]
            layers += 1
            same += int((a == b).sum())
            total += a.numel()
    return {"layers": layers, "of_theirs": len(theirs), "equal": same, "of": total}


def main() -> None:
    args = reading_args(__doc__, ROWS, "docs/data/interop/gptqmodel-read.json")
    if args.print:
        return print_table(read_record(args.out))
    rows = checked_rows(args.rows, ROWS)
    import_gptqmodel()
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    import gransearch as gs

    settings, tok, _, calib, ppl = reading_setup(args)
    record = open_record(args.out, settings)
    record.update(provenance())
    src = gs.models._resolve("smollm2-135m")  # the float folder converted from the packaged GGUF
    calib = [{"input_ids": w.tolist(), "attention_mask": [1] * w.numel()} for w in calib]

    for row in rows:
        if row in record["rows"]:
            print(f"{row}: done already", flush=True)
            continue
        t0 = time.perf_counter()
        qc = QuantizeConfig(**ROWS[row], offload_to_disk=False)  # its disk offload breaks on the CPU with transformers 5.24
        model = GPTQModel.load(src, qc, device="cpu")
        backend = BACKEND.AWQ_TORCH if ROWS[row].get("method") == "awq" else BACKEND.TORCH  # CPU kernels (AWQ's default packs for CUDA)
        model.quantize(calib, batch_size=4, tokenizer=tok, backend=backend)
        out = {"commit": record["commit"], "config": ROWS[row], "gptqmodel_seconds": round(time.perf_counter() - t0, 1)}
        with tempfile.TemporaryDirectory() as folder:
            model.save(folder)
            del model
            with open(os.path.join(folder, "config.json")) as fh:
                cfg = json.load(fh)
            qcfg = cfg["quantization_config"]
            out["saved"] = {k: qcfg.get(k) for k in ("quant_method", "checkpoint_format", "format", "bits", "group_size", "sym", "desc_act",
                                                     "pack_dtype")}
            out["float_dtype"] = cfg.get("dtype") or cfg.get("torch_dtype")
            theirs = GPTQModel.load(folder, device="cpu", backend=backend)  # its default: the saved float dtype
            out["gptqmodel_ppl"] = ppl(theirs.model)
            out["gptqmodel_scale_dtype"] = str(next(iter(their_scales(theirs.model))))
            del theirs
            theirs = GPTQModel.load(folder, device="cpu", backend=backend, dtype=torch.float16)  # the stored scales as stored
            their_w = their_weights(theirs.model)
            del theirs
            try:
                ours = gs.load_quantized(folder)
            except ValueError as exc:
                out["refused"] = str(exc).replace(folder, "<folder>")
            else:
                out["specs"] = sorted({str(m.spec) for m in ours.modules() if isinstance(m, gs.QuantLinear)})
                out["load_quantized_ppl"] = ppl(ours)
                out["weights"] = same_weights(ours, their_w)
                del ours
                out["load_quantized_fp32_ppl"] = ppl(gs.load_quantized(folder, dtype=torch.float32))
                out["from_disk_ppl"] = ppl(gs.offload.DiskModel(folder))
        keep_row(args.out, record, row, out)
    print_table(record)


def print_table(record: dict) -> None:
    r0 = next(iter(record["rows"].values()), {})
    print(f"\nSmolLM2-135M, first {record['settings']['test_tokens']:,} tokens of the wiki-sample test split; GPTQModel "
          f"{record['versions']['gptqmodel']}, floats saved as {r0.get('float_dtype')}\n")
    print("| row | saved as | specs read | GPTQModel (its bfloat16 loading) | gs.load_quantized | gs.load_quantized, float32 | from disk, "
          "float32 | weights equal to GPTQModel's |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for row, r in record["rows"].items():
        s = r["saved"]
        layout = s.get("checkpoint_format") or s.get("format")
        layout = f"awq {layout}" if s.get("quant_method") == "awq" else layout
        sym = s["sym"] if s.get("sym") is not None else r["config"].get("sym")  # GPTQModel's AWQ config says zero_point instead
        saved = f"{layout}, {s['bits']}-bit, group {s['group_size']}, sym={sym}, desc_act={s['desc_act']}"
        if "refused" in r:
            print(f"| {row} | {saved} | refused: {r['refused'].split(':')[1].strip()} | {r['gptqmodel_ppl']:.4f} | - | - | - | - |")
            continue
        w = r["weights"]
        print(f"| {row} | {saved} | {', '.join(r['specs'])} | {r['gptqmodel_ppl']:.4f} | {r['load_quantized_ppl']:.4f} | "
              f"{r['load_quantized_fp32_ppl']:.4f} | {r['from_disk_ppl']:.4f} | {w['equal']:,} of {w['of']:,} ({w['layers']} layers) |")


if __name__ == "__main__":
    main()
