"""How far llama.cpp's perplexity of a GGUF written by gransearch is from gransearch's own, and how
much of the gap emulating llama.cpp's 8-bit activation blocks in torch explains.

    python examples/gguf_gap.py --model smollm2-135m --specs float,w8g32s,w4g32s --windows 8
    python examples/gguf_gap.py --model gemma3-270m --specs float,embd,w8g32s,w4g32s --windows 2

For each spec (``float``: nothing quantized, linears and embedding in F32; ``embd``: only the
embedding in Q8_0; a spec: every linear at that spec by RTN, the embedding in Q8_0) the model is
written with its source GGUF's metadata and scored on the first ``--windows`` test windows of
wiki-sample (seqlen 512) three ways: torch, torch with llama.cpp's activation rounding
(:func:`gransearch.export.gguf.llamacpp_activations`), and llama.cpp.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import gransearch as gs
from gransearch.export import gguf as G


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--specs", default="float,w8g32s,w4g32s")
    ap.add_argument("--windows", type=int, default=8)
    args = ap.parse_args()
    print(f"{args.model}, first {args.windows} test windows of 512 tokens")
    print("| model | torch | torch, llama.cpp's activation rounding | llama.cpp | gap | gap emulated |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.specs.split(","):
            model, tok = gs.load_model(args.model)
            test = gs.load_tokens("wiki-sample", tok, "test")
            embd = "F32" if spec == "float" else "Q8_0"
            G.round_embeddings(model, embd)
            if spec not in ("float", "embd"):
                gs.quantize(model, spec, None, method="rtn", verbose=False)
            path = os.path.join(tmp, f"{spec}.gguf")
            G.save_gguf(model, path, source=args.model, embd_type=embd)
            ours = gs.perplexity(model, test, seqlen=512, batch_size=2, max_windows=args.windows, verbose=False).ppl
            with G.llamacpp_activations(model, embd):
                emulated = gs.perplexity(model, test, seqlen=512, batch_size=2, max_windows=args.windows, verbose=False).ppl
            cpp = gs.llamacpp.perplexity(path, test, seqlen=512, max_windows=args.windows, verbose=False).ppl
            print(f"| {spec} | {ours:.4f} | {emulated:.4f} | {cpp:.4f} | {100 * (cpp / ours - 1):+.3f}% | {100 * (cpp / emulated - 1):+.3f}% |",
                  flush=True)
            os.remove(path)


if __name__ == "__main__":
    main()
