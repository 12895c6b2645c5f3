"""What a new user's first calls cost on the packaged SmolLM2-135M, and what the checks added.

    python benchmarks/first_use.py [--n-calib 128] [--seqlen 512]

Rows, timed in one process on the same model and calibration windows:

* ``gs.quantize(model, "w4g64", calib, method="rtn")``: the default since the reliability work
  (no calibration pass: RTN reads each weight alone) against the same call with
  ``objective=True`` (what the default used to do: a sequential calibration pass only to fill the
  per-layer records);
* the integrity checks a resumed search adds: the model's weights fingerprint and the sha256 of
  the packaged GGUF (the cache key), against one perplexity evaluation of 16 x 512 tokens (a
  trial's cost), so their share of a search is visible.
"""

from __future__ import annotations

import argparse
import os
import time

import gransearch as gs
from gransearch.models import file_sha256, packaged_gguf
from gransearch.plan import weights_fingerprint

from eval_speed import machine  # noqa: E402  (same folder)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    load_s, (model, tok) = timed(lambda: gs.load_model(args.model))
    calib = gs.sample_windows(gs.load_tokens("wiki-sample", tok, "train"), args.n_calib, args.seqlen, seed=0)
    val = gs.load_tokens("wiki-sample", tok, "validation")

    fresh, _ = gs.load_model(args.model)
    rtn_new, _ = timed(lambda: gs.quantize(fresh, "w4g64", calib, method="rtn", verbose=False))
    fresh, _ = gs.load_model(args.model)
    rtn_old, _ = timed(lambda: gs.quantize(fresh, "w4g64", calib, method="rtn", objective=True, verbose=False))

    fp_s, _ = timed(lambda: weights_fingerprint(model))
    path = packaged_gguf(args.model) if args.model in gs.models.PACKAGED_MODELS else None
    cache = os.path.join(gs.models.cache_dir(), "file-sha256.json")
    if path and os.path.exists(cache):
        os.remove(cache)  # time the first, uncached hash
    sha_s = timed(lambda: file_sha256(path))[0] if path else float("nan")
    sha_again = timed(lambda: file_sha256(path))[0] if path else float("nan")
    ppl_s, _ = timed(lambda: gs.perplexity(model, val, seqlen=512, batch_size=4, max_windows=16, verbose=False))

    print(f"\n## First calls: {args.model}, calibration {args.n_calib} x {args.seqlen} tokens (load from cache: {load_s:.1f} s)")
    print("| call | seconds | ratio |\n|---|---:|---:|")
    print(f"| quantize(..., method='rtn') with objective=True (the old default: a calibration pass) | {rtn_old:.1f} | 1.000 |")
    print(f"| quantize(..., method='rtn') default (no calibration pass) | {rtn_new:.2f} | {rtn_new / rtn_old:.3f} |")
    print("\n## Integrity checks against one proxy evaluation (16 x 512 tokens, a trial's cost)")
    print("| work | seconds | ratio |\n|---|---:|---:|")
    print(f"| perplexity, 16 x 512 validation tokens | {ppl_s:.2f} | 1.000 |")
    print(f"| weights_fingerprint(model) | {fp_s:.3f} | {fp_s / ppl_s:.4f} |")
    print(f"| sha256 of the GGUF file, first time | {sha_s:.3f} | {sha_s / ppl_s:.4f} |")
    print(f"| sha256 of the GGUF file, remembered | {sha_again:.4f} | {sha_again / ppl_s:.5f} |")


if __name__ == "__main__":
    main()
