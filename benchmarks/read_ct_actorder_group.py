"""gransearch reading compressed-tensors' removed ``actorder="group"`` layout, against compressed-tensors 0.18 itself.

    pip install --no-deps --target .ct-0.18 compressed-tensors==0.18.0     # the last layout that had it
    PYTHONPATH=.ct-0.18 .venv/bin/python benchmarks/read_ct_actorder_group.py [--rows asym,sym]
                                                                             [--out docs/data/interop/ct-actorder-group.json]
    .venv/bin/python benchmarks/read_ct_actorder_group.py --print          # the table of the committed record

Checkpoints quantized by llm-compressor's GPTQ with ``actorder="group"`` store ``weight_g_idx``:
each group is ``group_size`` consecutive columns of the activation order, scattered along the row.
compressed-tensors 0.19 and later refuse that setting, so transformers no longer loads those
checkpoints; gransearch reads them (:func:`gransearch.quantizer.group_index`). This script proves
the reading against compressed-tensors 0.18.0 (its ``--no-deps`` wheel over this venv's torch and
transformers), which wrote and read the layout:

1. SmolLM2-135M (bfloat16, as llm-compressor saves it) gets 0.18's own quantization config (4-bit
   groups of 64 with ``actorder="group"`` on every ``Linear`` but the head). Each layer's column
   order is its weight's column norms, largest first (a stand-in for GPTQ's activation order: the
   claim is the layout, not the order's merit); ``weight_g_idx`` is set from it, and the scales and
   zero points of each group come from 0.18's ``calculate_qparams`` on that group's columns (min-max
   rounding: GPTQ's updates would change the codes, not the layout).
2. 0.18's ``ModelCompressor`` compresses and saves the model (``pack-quantized`` with
   ``weight_g_idx``), as llm-compressor's ``save_pretrained`` did.
3. gransearch reads the folder with ``gs.load_quantized`` (in bfloat16 and float32) and block by
   block from disk; each weight it reads is compared with 0.18's ``fake_quantize`` of that layer
   with its ``g_idx`` (the weight 0.18 compressed), and the perplexities with that of SmolLM2 holding
   0.18's weights.
4. transformers loads the same folder with 0.18 installed (``load_in_transformers``, as a user
   would), for the record of what that gives.

Perplexity on the first ``--test-tokens`` wiki-sample test tokens.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch

from vs_llmcompressor import checked_rows, commit, keep_row, open_record, read_record, reading_args

ROWS = {"asym": dict(symmetric=False), "sym": dict(symmetric=True)}
GROUP = 64


def import_old_ct():
    try:
        import compressed_tensors
    except ImportError:
        compressed_tensors = None
    if compressed_tensors is None or tuple(int(v) for v in compressed_tensors.__version__.split(".")[:2]) >= (0, 19):
        raise SystemExit("needs compressed-tensors before 0.19 (it removed actorder='group'): "
                         "pip install --no-deps --target .ct-0.18 compressed-tensors==0.18.0, then run with PYTHONPATH=.ct-0.18")
    return compressed_tensors


def write_checkpoint(folder: str, symmetric: bool) -> dict[str, torch.Tensor]:
    """SmolLM2 quantized and saved by compressed-tensors 0.18 with actorder='group' (steps 1 and 2).
    Returns ``{layer: compressed-tensors' weight}``: its ``fake_quantize`` with the layer's ``g_idx``,
    the weight it compresses."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme, apply_quantization_config
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    import gransearch as gs

    model, _ = gs.load_model("smollm2-135m", dtype=torch.bfloat16)
    args = QuantizationArgs(num_bits=4, symmetric=symmetric, strategy="group", group_size=GROUP, actorder="group")
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                                        ignore=["lm_head"]))
    want = {}
    for name, m in model.named_modules():
        if getattr(getattr(m, "quantization_scheme", None), "weights", None) is None:
            continue
        w = m.weight.detach()
        order = torch.argsort(w.float().norm(dim=0), descending=True, stable=True)
        blocks = w[:, order].reshape(w.shape[0], -1, GROUP)
        scale, zero = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args)
        m.weight_scale.data = scale.to(m.weight_scale.dtype).reshape(m.weight_scale.shape)
        zp = getattr(m, "weight_zero_point", None)
        if zp is not None:
            zp.data = zero.to(zp.dtype).reshape(zp.shape)
        m.weight_g_idx.data = (torch.arange(w.shape[1]) // GROUP)[torch.argsort(order)].to(m.weight_g_idx.dtype)
        want[name] = fake_quantize(w, m.weight_scale, zp if zp is not None else torch.zeros_like(m.weight_scale), args,
                                   g_idx=m.weight_g_idx)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(folder)
    return want


def with_weights(weights: dict[str, torch.Tensor]):
    """SmolLM2 in bfloat16 with its quantized layers' weights replaced by ``weights``."""
    import gransearch as gs

    model, _ = gs.load_model("smollm2-135m", dtype=torch.bfloat16)
    for name, w in weights.items():
        model.get_submodule(name).weight.data = w.to(torch.bfloat16)
    return model


def main() -> None:
    args = reading_args(__doc__, ROWS, "docs/data/interop/ct-actorder-group.json", calib=False)
    if args.print:
        return print_table(read_record(args.out))
    rows = checked_rows(args.rows, ROWS)
    ct = import_old_ct()
    import gransearch as gs

    _, tok = gs.load_model("smollm2-135m")
    test = gs.load_tokens("wiki-sample", tok, "test")[: args.test_tokens]

    def ppl(model) -> float:
        return gs.perplexity(model, test, seqlen=512, batch_size=4, verbose=False).ppl

    record = open_record(args.out, {"model": "smollm2-135m", "test_tokens": args.test_tokens, "group_size": GROUP})
    record.update({"commit": commit(), "versions": {"compressed_tensors": ct.__version__, "torch": torch.__version__},
                   "command": "python benchmarks/read_ct_actorder_group.py " + " ".join(sys.argv[1:])})
    for row in rows:
        if row in record["rows"]:
            print(f"{row}: done already", flush=True)
            continue
        t0 = time.perf_counter()
        out = {"commit": record["commit"], "config": ROWS[row]}
        with tempfile.TemporaryDirectory() as folder:
            theirs = write_checkpoint(folder, **ROWS[row])
            out["compressed_tensors_ppl"] = ppl(with_weights(theirs))
            ours = gs.load_quantized(folder)
            layers = same = total = scattered = 0
            for name, m in ours.named_modules():
                if isinstance(m, gs.QuantLinear):
                    a, b = m.quantized_weight().dequantize(torch.bfloat16), theirs[name]
                    layers, same, total = layers + 1, same + int((a == b).sum()), total + a.numel()
                    scattered += m.g_idx is not None
            out["weights"] = {"layers": layers, "of_theirs": len(theirs), "with_g_idx": scattered, "equal": same, "of": total}
            out["specs"] = sorted({str(m.spec) for m in ours.modules() if isinstance(m, gs.QuantLinear)})
            out["load_quantized_ppl"] = ppl(ours)
            del ours
            out["load_quantized_fp32_ppl"] = ppl(gs.load_quantized(folder, dtype=torch.float32))
            out["from_disk_ppl"] = ppl(gs.offload.DiskModel(folder))
            try:  # what a user of transformers gets from the same folder with this compressed-tensors
                out["transformers_ppl"] = ppl(gs.export.load_in_transformers(folder))
            except Exception as exc:  # noqa: BLE001  recorded, not raised: the row is about gransearch's reading
                out["transformers_error"] = f"{type(exc).__name__}: {exc}"[:300]
        out["seconds"] = round(time.perf_counter() - t0, 1)
        keep_row(args.out, record, row, out)
    print_table(record)


def print_table(record: dict) -> None:
    print(f"\nSmolLM2-135M (bfloat16), 4-bit groups of {record['settings']['group_size']}, actorder='group', written by compressed-tensors "
          f"{record['versions']['compressed_tensors']}; first {record['settings']['test_tokens']:,} wiki-sample test tokens\n")
    print("| row | specs read | layers with a g_idx | compressed-tensors' weights | gs.load_quantized | gs.load_quantized, float32 | "
          "from disk, float32 | weights equal to compressed-tensors' | transformers with that compressed-tensors |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row, r in record["rows"].items():
        w = r["weights"]
        hf = f"{r['transformers_ppl']:.4f}" if "transformers_ppl" in r else r.get("transformers_error", "-")
        print(f"| {row} | {', '.join(r['specs'])} | {w['with_g_idx']} of {w['layers']} | {r['compressed_tensors_ppl']:.4f} | "
              f"{r['load_quantized_ppl']:.4f} | {r['load_quantized_fp32_ppl']:.4f} | {r['from_disk_ppl']:.4f} | "
              f"{w['equal']:,} of {w['of']:,} ({w['layers']} layers) | {hf} |")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
