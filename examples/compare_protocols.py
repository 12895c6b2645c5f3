"""One-shot (ablation bank) against sequential (gs.quantize) weight quantization, from the two CSVs.

    python examples/compare_protocols.py [--ablation docs/data/ablation/weights.csv]
                                         [--sequential docs/data/quantize_table.csv]

Both protocols calibrate on the same 128 x 512 train tokens; they are scored on different slices of
the test split (first 40 windows vs all 81), so the comparison is on the perplexity change against
the unquantized model scored on the same slice. Plain GPTQ (no act-order) rows only.
"""

import argparse
import csv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ablation", default="docs/data/ablation/weights.csv")
    ap.add_argument("--sequential", default="docs/data/quantize_table.csv")
    args = ap.parse_args()
    with open(args.ablation) as fh:
        one = {(r["method"], r["spec"]): float(r["delta_pct"]) for r in csv.DictReader(fh)}
    with open(args.sequential) as fh:
        seq = {(r["method"], r["spec"]): float(r["delta_pct"]) for r in csv.DictReader(fh) if r["variant"] in ("plain", "-")}
    print("| spec | method | one-shot change | sequential change |")
    print("|---|---|---:|---:|")
    for key in sorted(set(one) & set(seq), key=lambda k: (k[1], ["fp", "rtn", "gptq", "awq", "awq+gptq"].index(k[0]))):
        if key[0] == "fp":
            continue
        print(f"| {key[1]} | {key[0]} | {one[key]:+.2f}% | {seq[key]:+.2f}% |")


if __name__ == "__main__":
    main()
