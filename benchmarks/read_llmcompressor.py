"""gransearch reading llm-compressor's checkpoints: the same weights, the same perplexity.

    bash scripts/llmcompressor_env.sh    # .venv-llmc: llm-compressor + gransearch (see vs_llmcompressor.py)
    .venv-llmc/bin/python benchmarks/read_llmcompressor.py [--rows sym,asym,w8c,mixed,gptq-actorder]
                                                          [--out docs/data/interop/llmcompressor-read.json]
    .venv/bin/python benchmarks/read_llmcompressor.py --print    # the table of the committed record

Each row quantizes a fresh SmolLM2-135M (float32, as ``gs.load_model`` gives it) with llm-compressor's
``oneshot`` and saves it as llm-compressor does (``save_pretrained(..., save_compressed=True)``):
its ``Linear`` targets, its ignore list, float32 scales, packed zero points. Then, in the same process:

* ``llm-compressor``: the perplexity of llm-compressor's model in memory, right after ``oneshot``;
* ``gs.load_quantized``: of gransearch's reading of the saved folder (``QuantLinear`` layers);
* ``from disk``: of gransearch's block-by-block reading of it (``gransearch eval --from-disk``);
* ``weights``: how many of the quantized layers' weights gransearch reads equal those transformers
  and compressed-tensors decompress from the same folder (``CompressedTensorsConfig(dequantize=True)``).

Rows (groups of 64 where grouped: SmolLM2's 576-wide inputs do not divide into 128):
``sym`` W4A16 symmetric; ``asym`` W4A16 asymmetric; ``w8c`` 8-bit symmetric per channel; ``mixed``
two config groups (8-bit channels on ``re:.*down_proj``, 4-bit asymmetric groups of 32 on the rest)
and the first block's ``q_proj`` ignored; ``gptq-actorder`` llm-compressor's GPTQ (its default
``actorder="static"``) on 32 x 512 calibration tokens. The test text is the first ``--test-tokens``
tokens of the wiki-sample test split: the claim is equality, not a perplexity level
(docs/data/interop/llmcompressor.json compares the two tools' quantization on the whole split).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import torch

from vs_llmcompressor import (calib_loader, checked_rows, import_llmcompressor, keep_row, open_record, provenance, read_record,
                              reading_args, reading_setup)

ROWS = ("sym", "asym", "w8c", "mixed", "gptq-actorder")
IGNORED = "model.layers.0.self_attn.q_proj"


def weights(bits: int, symmetric: bool, group: int | None) -> dict:
    out = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group" if group else "channel"}
    return {**out, "group_size": group} if group else out


def recipe(row: str):
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    groups = {"sym": {"group_0": {"targets": ["Linear"], "weights": weights(4, True, 64)}},
              "asym": {"group_0": {"targets": ["Linear"], "weights": weights(4, False, 64)}},
              "w8c": {"group_0": {"targets": ["Linear"], "weights": weights(8, True, None)}},
              "mixed": {"group_0": {"targets": ["re:.*down_proj"], "weights": weights(8, True, None)},
                        "group_1": {"targets": ["Linear"], "weights": weights(4, False, 32)}},
              "gptq-actorder": {"group_0": {"targets": ["Linear"], "weights": weights(4, True, 64)}}}[row]
    ignore = ["lm_head", IGNORED] if row == "mixed" else ["lm_head"]
    if row == "gptq-actorder":
        return GPTQModifier(config_groups=groups, ignore=ignore, dampening_frac=0.01, block_size=128)
    return QuantizationModifier(config_groups=groups, ignore=ignore)


def same_weights(folder: str, ours) -> dict:
    """Weights of gransearch's reading equal to transformers + compressed-tensors' decompression."""
    import gransearch as gs
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    theirs = AutoModelForCausalLM.from_pretrained(folder, quantization_config=CompressedTensorsConfig(dequantize=True),
                                                  dtype=torch.float32)
    layers = same = total = 0
    for name, m in ours.named_modules():
        if isinstance(m, gs.QuantLinear):
            a, b = m.dequantized_weight(), theirs.get_submodule(name).weight.detach()
            layers += 1
            same += int((a == b.to(a.dtype)).sum())
            total += a.numel()
    return {"layers": layers, "equal": same, "of": total}


def main() -> None:
    args = reading_args(__doc__, ROWS, "docs/data/interop/llmcompressor-read.json")
    if args.print:
        return print_table(read_record(args.out))
    rows = checked_rows(args.rows, ROWS)
    oneshot = import_llmcompressor()

    import gransearch as gs

    settings, _, _, calib, ppl = reading_setup(args)
    record = open_record(args.out, settings)
    record.update(provenance("read_llmcompressor.py"))

    for row in rows:
        if row in record["rows"]:
            print(f"{row}: done already", flush=True)
            continue
        model, _ = gs.load_model("smollm2-135m")
        t0 = time.perf_counter()
        gptq = row == "gptq-actorder"
        oneshot(model=model, dataset=calib_loader(calib) if gptq else None, recipe=recipe(row), num_calibration_samples=args.n_calib,
                max_seq_length=512, pipeline="sequential" if gptq else "independent")
        out = {"commit": record["commit"], "llmcompressor_seconds": round(time.perf_counter() - t0, 1), "llmcompressor_ppl": ppl(model)}
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder, save_compressed=True)
            del model
            with open(os.path.join(folder, "config.json")) as fh:
                qc = json.load(fh)["quantization_config"]
            out["targets"] = {g: v["targets"] for g, v in qc["config_groups"].items()}
            out["ignore"] = qc["ignore"]
            ours = gs.load_quantized(folder)
            out["scale_dtype"] = str(next(m.scales.dtype for m in ours.modules() if isinstance(m, gs.QuantLinear)))
            out["specs"] = sorted({str(m.spec) for m in ours.modules() if isinstance(m, gs.QuantLinear)})
            out["load_quantized_ppl"] = ppl(ours)
            out["weights"] = same_weights(folder, ours)
            del ours
            out["from_disk_ppl"] = ppl(gs.offload.DiskModel(folder))
        keep_row(args.out, record, row, out)
    print_table(record)


def print_table(record: dict) -> None:
    print(f"\nSmolLM2-135M, first {record['settings']['test_tokens']:,} tokens of the wiki-sample test split\n")
    print("| row | specs read | scales | llm-compressor (in memory) | gs.load_quantized | from disk | weights equal to transformers' |")
    print("|---|---|---|---:|---:|---:|---:|")
    for row, r in record["rows"].items():
        w = r["weights"]
        print(f"| {row} | {', '.join(r['specs'])} | {r['scale_dtype'].removeprefix('torch.')} | {r['llmcompressor_ppl']:.4f} | "
              f"{r['load_quantized_ppl']:.4f} | {r['from_disk_ppl']:.4f} | {w['equal']:,} of {w['of']:,} ({w['layers']} layers) |")


if __name__ == "__main__":
    main()
