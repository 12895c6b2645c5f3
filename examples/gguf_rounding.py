"""Which rounding fills llama.cpp's Q2_K mix best? One mix, six ways to round its Q4_0 tensors.

    python examples/gguf_presets.py --out runs/gguf --presets Q2_K    # builds the bank it reads
    python examples/gguf_rounding.py --bank runs/gguf/bank [--windows 16]

The mix is llama.cpp's Q2_K preset on SmolLM2-135M (every attention and gate/up tensor Q4_0, every
ffn_down Q3_K, the embedding Q8_0: 86,416,128 tensor bytes); ffn_down is llama.cpp's Q3_K with the
importance matrix throughout. The Q4_0 tensors come from the stored gguf bank (one-shot, on the
float model's calibration statistics: 128 x 512 tokens of wiki-sample train), rounded by llama.cpp
with the importance matrix (the preset itself), GPTQ (act-order) / RTN / AWQ on gransearch's
symmetric grid, llama.cpp's IQ4_NL (same bytes), and -- the issue's "frontier" -- GPTQ error
feedback on llama.cpp's own Q4_0 grid (its imatrix-chosen block scales kept, GPTQ choosing the
codes). Each row: the summed layer objective tr((W-Q) H (W-Q)^T) of those tensors, the proxy
perplexity the search sees (validation windows) and torch's perplexity on the test windows.
"""

from __future__ import annotations

import argparse

import torch

import gransearch as gs
from gransearch.algorithms.gptq import _column_groups, _dead_zeroed, gptq_prepare
from gransearch.arch import get_module, linear_weight
from gransearch.bank import Bank
from gransearch.export import gguf as G
from gransearch.quantizer import QuantizedWeight
from gransearch.search import _Assembler


@torch.no_grad()
def gptq_on_grid(W: torch.Tensor, H: torch.Tensor, scale: torch.Tensor, damp: float = 0.01, block: int = 128) -> QuantizedWeight:
    """GPTQ's column loop (act-order) with every Q4_0 block's scale fixed to ``scale`` ``[out, in/32]``:
    only the codes are chosen, so the result is still a Q4_0 tensor with llama.cpp's scales."""
    prep = gptq_prepare(H, damp=damp, act_order=True)
    W = _dead_zeroed(W.clone(), prep)
    rows, n = W.shape
    S = scale.float()[:, _column_groups(prep, n, 32, W.device)]
    Wp = W[:, prep.perm]
    codes = torch.zeros_like(Wp)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1, Hinv1 = Wp[:, i1:i2].clone(), prep.hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            s, w = S[:, i1 + i], W1[:, i]
            c = torch.clamp(torch.round(w / s) + 8, 0, 15)
            codes[:, i1 + i] = c
            err = (w - (c - 8) * s) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Wp[:, i2:] -= Err1 @ prep.hinv[i1:i2, i2:]
    codes = codes[:, torch.argsort(prep.perm)]
    return QuantizedWeight(codes.to(torch.uint8), scale.to(torch.float16), None, gs.QuantSpec.parse("w4g32s"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bank", default="runs/gguf/bank")
    ap.add_argument("--windows", type=int, default=16, help="validation windows of the proxy (the search's)")
    ap.add_argument("--test-windows", type=int, default=None, help="test windows (default: the whole split)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = gs.load_model("smollm2-135m")
    G.round_embeddings(model, "Q8_0")
    calib = gs.sample_windows(gs.load_tokens("wiki-sample", tok, "train"), 128, 512, seed=0)
    val = gs.load_tokens("wiki-sample", tok, "validation")
    test = gs.load_tokens("wiki-sample", tok, "test")
    bank = Bank.load(args.bank)
    if bank is None:
        raise SystemExit(f"no bank in {args.bank}: run examples/gguf_presets.py --out runs/gguf first")
    asm = _Assembler(model, bank)
    q4 = [i for i, n in enumerate(bank.layers) if not n.endswith("down_proj")]
    stats = None
    rows = []
    for label, key in [("llama.cpp Q4_0 + imatrix (the preset)", "llamacpp:w4g32s"), ("GPTQ act-order, Q4_0", "gptq:w4g32s"),
                       ("RTN, Q4_0", "rtn:w4g32s"), ("AWQ, Q4_0", "awq:w4g32s"), ("llama.cpp IQ4_NL + imatrix", "llamacpp:IQ4_NL"),
                       ("GPTQ on llama.cpp's Q4_0 scales", None)]:
        choice = [bank.index(i, "llamacpp:Q3_K" if n.endswith("down_proj") else (key or "llamacpp:w4g32s")) for i, n in enumerate(bank.layers)]
        mdl = asm.load(choice)
        if key is None:  # replace the preset's Q4_0 codes by GPTQ's on the same scales
            stats = stats or gs.calibrate(model, calib)
            obj = 0.0
            for i in q4:
                n = bank.layers[i]
                W = linear_weight(get_module(model, n)).detach().float()
                scales = bank.entries[i][choice[i]].quantized().scale
                q = gptq_on_grid(W, stats[n].hessian, scales)
                obj += gs.layer_objective(W, q.dequantize(), stats[n].hessian)
                linear_weight(get_module(mdl, n)).data.copy_(q.dequantize())
            asm.current = [-1] * len(choice)  # the working copy no longer holds bank entries
        else:
            obj = sum(bank.entries[i][choice[i]].objective for i in q4)
        proxy = gs.perplexity(mdl, val, seqlen=512, batch_size=4, max_windows=args.windows, verbose=False).ppl
        ppl = gs.perplexity(mdl, test, seqlen=512, batch_size=4, max_windows=args.test_windows, verbose=False).ppl
        rows.append((label, obj, proxy, ppl))
        print(f"{label}: objective {obj:.1f}, proxy {proxy:.3f}, test {ppl:.3f}", flush=True)
    print(f"\nSmolLM2-135M, llama.cpp's Q2_K mix, torch (float32) perplexity; proxy: {args.windows} validation windows, "
          f"test: {'all' if args.test_windows is None else args.test_windows} test windows of 512")
    print("| Q4_0 tensors rounded by | layer objective (sum) | proxy | test |\n|---|---:|---:|---:|")
    for label, obj, proxy, ppl in rows:
        print(f"| {label} | {obj:.1f} | {proxy:.3f} | {ppl:.3f} |")


if __name__ == "__main__":
    main()
