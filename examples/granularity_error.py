"""Quantize one random layer with outlier input channels and print error and bytes per granularity.

    python examples/granularity_error.py [--out 1536 --in 576 --seed 0]

The weight is Gaussian with 8 large-magnitude entries, the situation that makes coarse
granularities fail; the error is the MSE relative to the weight's mean square.
"""

import argparse

import torch

import gransearch as gs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=int, default=1536)
    ap.add_argument("--in", dest="inp", type=int, default=576)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    w = torch.randn(args.out, args.inp, generator=g) * 0.02
    w[torch.randint(0, args.out, (8,), generator=g), torch.randint(0, args.inp, (8,), generator=g)] *= 40
    fp_bytes = w.numel() * 2
    print(f"layer [{args.out}, {args.inp}], float16 size {fp_bytes:,} bytes")
    print(f"{'spec':>8} {'bytes':>10} {'bits/w':>7} {'rel. MSE':>10}")
    for bits in (8, 4, 3):
        for gran in ("t", "c", "g64", "g32"):
            spec = gs.QuantSpec.parse(f"w{bits}{gran}")
            q = gs.rtn(w, spec)
            mse = float(((w - q.dequantize()) ** 2).mean() / (w**2).mean())
            print(f"{str(spec):>8} {q.nbytes:>10,} {gs.bits_per_weight(w.shape, spec):>7.3f} {mse:>10.2e}")


if __name__ == "__main__":
    main()
