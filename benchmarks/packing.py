"""Packed codes of 3, 5, 6 and 7 bits, read back and packed: now against the former code, in one process.

    python benchmarks/packing.py [--model smollm2-135m] [--bits 3,5,6,7] [--spec-suffix g64] [--repeats 3] [--record FILE]

What a search trial does for every layer whose candidate changed when its bank is stored on disk
(``bank_dir``, the README search, every search from disk): read the packed buffers and unpack
them (``QuantizedWeight.from_packed``), then dequantize. Widths that do not divide 8 (3, 5, 6, 7
bits) used to be unpacked by exploding every byte into 8 bits and summing them back per code; now
8 codes are read as one integer word of ``bits`` bytes. The stored bytes are the same.

Every linear of the model is quantized once with RTN at ``w{bits}{suffix}`` and packed; then, for
each width, the whole model's buffers are unpacked and dequantized (a) with the former code and
(b) with ``gransearch.unpack_codes``, interleaved, ``--repeats`` times; the best time of each is
kept. Both give identical codes (checked). Packing is timed the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import gransearch as gs
from gransearch.arch import linear_weight, model_linears
from gransearch.quantizer import pack_codes, unpack_codes

from eval_speed import machine  # noqa: E402  (same folder)


def former_unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The dense-stream unpacking of widths that do not divide 8, as it was before (commit edfdaf5)."""
    need = (n * bits + 7) // 8
    packed = packed.reshape(-1).to(torch.uint8)
    byte_shift = torch.arange(8, dtype=torch.uint8)
    stream = ((packed[:need].unsqueeze(1) >> byte_shift) & 1).reshape(-1)[: n * bits]
    bit_w = (1 << torch.arange(bits, dtype=torch.int32)).to(torch.int32)
    return (stream.view(n, bits).to(torch.int32) * bit_w).sum(dim=1).to(torch.uint8)


def former_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The dense-stream packing, as it was before (commit edfdaf5)."""
    flat = codes.reshape(-1).to(torch.uint8)
    nbytes = (flat.numel() * bits + 7) // 8
    stream = ((flat.unsqueeze(1) >> torch.arange(bits, dtype=torch.uint8)) & 1).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros(nbytes * 8 - stream.numel())])
    return (stream.view(-1, 8) << torch.arange(8, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", default="3,5,6,7")
    ap.add_argument("--spec-suffix", default="g64", help="granularity of the specs: g64, g32, c ...")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--record", default=None, help="write the figures to this JSON file")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    model, _ = gs.load_model(args.model)
    weights = [linear_weight(ref.module).detach() for ref in model_linears(model)]
    n_weights = sum(w.numel() for w in weights)
    rows = []
    print(f"\n## Packed codes of every linear of {args.model} ({len(weights)} layers, {n_weights:,} weights), best of {args.repeats}")
    print("| spec | former unpack + dequantize s | now s | ratio | former pack s | now s | ratio |\n|---|---:|---:|---:|---:|---:|---:|")
    for bits in (int(b) for b in args.bits.split(",")):
        spec = gs.QuantSpec.parse(f"w{bits}{args.spec_suffix}")
        qs = [gs.rtn(w, spec) for w in weights]
        bufs = [q.packed() for q in qs]
        for q, b in zip(qs, bufs):  # the same stored bytes, read back to the same codes
            assert torch.equal(b["qweight"], former_pack(q.codes, bits))
            assert torch.equal(former_unpack(b["qweight"], bits, q.codes.numel()), unpack_codes(b["qweight"], bits, q.codes.numel()))

        def read(unpack):
            def run():
                for q, b in zip(qs, bufs):
                    codes = unpack(b["qweight"], bits, q.codes.numel()).view(q.shape)
                    zero = None if q.zero is None else unpack(b["qzeros"], bits, q.zero.numel()).view(q.zero.shape)
                    gs.QuantizedWeight(codes, b["scales"], zero, spec).dequantize()
            return run

        def pack(fn):
            def run():
                for q in qs:
                    fn(q.codes, bits)
                    if q.zero is not None:
                        fn(q.zero, bits)
            return run

        t_old, t_new, p_old, p_new = [], [], [], []
        for _ in range(args.repeats):  # interleaved
            t_old.append(seconds(read(former_unpack)))
            t_new.append(seconds(read(unpack_codes)))
            p_old.append(seconds(pack(former_pack)))
            p_new.append(seconds(pack(pack_codes)))
        row = {"spec": str(spec), "read_former_s": min(t_old), "read_now_s": min(t_new), "pack_former_s": min(p_old), "pack_now_s": min(p_new)}
        rows.append(row)
        print(f"| {spec} | {row['read_former_s']:.3f} | {row['read_now_s']:.3f} | {row['read_now_s'] / row['read_former_s']:.3f} "
              f"| {row['pack_former_s']:.3f} | {row['pack_now_s']:.3f} | {row['pack_now_s'] / row['pack_former_s']:.3f} |")
    if args.record:
        with open(args.record, "w") as fh:
            json.dump({"machine": machine(), "command": "python benchmarks/packing.py " + " ".join(sys.argv[1:]), "model": args.model,
                       "n_weights": n_weights, "repeats": args.repeats, "rows": rows}, fh, indent=1)
        print(f"recorded in {args.record}")


if __name__ == "__main__":
    main()
