"""Which proxy tells GGUF plans apart? Perplexity and KL divergence on more and fewer validation windows.

    python examples/gguf_presets.py --out runs/gguf --presets Q2_K [--proxy kl]   # the bank and plans it reads
    python examples/gguf_proxy.py --out runs/gguf [--windows 16,64]

At SmolLM2's Q2_K size (86,416,128 tensor bytes) a few plans of the same bytes, all from the stored
gguf bank (one-shot, on the float model's calibration statistics; torch, float32): llama.cpp's own
Q2_K mix with the importance matrix (the preset), the same mix with IQ4_NL in the Q4_0 tensors'
place, and the best plan of each search run in --out (plan-Q2_K*.json). For each: perplexity and
the KL divergence from the float model (embedding in Q8_0, as the files store it) on the first
16 validation windows (what the search's proxy sees), on windows 16..64 (unseen by the search),
and the perplexity of the first 64 test windows. A proxy is useful when its ranking on the first
16 windows holds on the unseen ones.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import torch

import gransearch as gs
from gransearch.bank import Bank
from gransearch.evaluate import kl_divergence, reference_logprobs, windows
from gransearch.export import gguf as G
from gransearch.search import _Assembler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gguf")
    ap.add_argument("--seen", type=int, default=16, help="validation windows the search's proxy saw")
    ap.add_argument("--windows", type=int, default=64, help="validation windows scored in all")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = gs.load_model("smollm2-135m")
    G.round_embeddings(model, "Q8_0")
    val = gs.load_tokens("wiki-sample", tok, "validation")
    test = gs.load_tokens("wiki-sample", tok, "test")
    bank = Bank.load(os.path.join(args.out, "bank"))
    if bank is None:
        raise SystemExit(f"no bank in {args.out}/bank: run examples/gguf_presets.py --out {args.out} --presets Q2_K first")
    asm = _Assembler(model, bank)

    def mix(other: str) -> list[int]:
        return [bank.index(i, "llamacpp:Q3_K" if n.endswith("down_proj") else other) for i, n in enumerate(bank.layers)]

    plans = {"llama.cpp Q2_K + imatrix (the preset)": mix("llamacpp:w4g32s"), "the preset, IQ4_NL for Q4_0": mix("llamacpp:IQ4_NL")}
    for path in sorted(glob.glob(os.path.join(args.out, "plan-Q2_K*.json"))):
        layers = json.load(open(path))["layers"]
        keys = [f"{layers[n]['method']}:{layers[n]['spec']}" for n in bank.layers]
        if all(k in bank.keys[i] for i, k in enumerate(keys)) and "seeded" not in path:
            plans[f"search: {os.path.basename(path)}"] = [bank.index(i, k) for i, k in enumerate(keys)]
    n = min(args.windows, windows(val, 512).shape[0])
    head, tail = val[: args.seen * 512], val[args.seen * 512 : n * 512]
    refs = [reference_logprobs(model, ids, 512, batch_size=4, verbose=False) for ids in (head, tail)]
    rows = []
    for label, choice in plans.items():
        mdl = asm.load(choice)
        a, b = (kl_divergence(mdl, ids, ref, 512, batch_size=4, verbose=False) for ids, ref in zip((head, tail), refs))
        t = gs.perplexity(mdl, test, seqlen=512, batch_size=4, max_windows=n, verbose=False).ppl
        rows.append((label, a, b, t))
        print(f"{label}: KL {a.kl:.4f}/{b.kl:.4f}, ppl {a.ppl:.3f}/{b.ppl:.3f}, test {t:.3f}", flush=True)
    print(f"\nSmolLM2-135M at the Q2_K size (86,416,128 tensor bytes), bank entries, torch float32; validation windows "
          f"0..{args.seen} (the proxy's) and {args.seen}..{n} (unseen); test: first {n} windows; KL from the float model "
          "(+- standard error over windows)\n")
    print(f"| plan | KL, windows 0-{args.seen} | KL, windows {args.seen}-{n} | ppl, 0-{args.seen} | ppl, {args.seen}-{n} | test ppl |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, a, b, t in rows:
        print(f"| {label} | {a.kl:.4f} +- {a.kl_se:.4f} | {b.kl:.4f} +- {b.kl_se:.4f} | {a.ppl:.3f} | {b.ppl:.3f} | {t:.3f} |")


if __name__ == "__main__":
    main()
