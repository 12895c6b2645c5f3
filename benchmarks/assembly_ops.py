"""Operations of a search trial's assembly (each one kernel or copy on a GPU), the two caches of the assembler.

    python benchmarks/assembly_ops.py [--blocks 2]

The trial assembler (``gransearch.search._Assembler``) puts each trial's bank entries into a working
model. On a GPU it caches them: as unpacked codes (what it always did, and still does when the
bank's float weights do not fit its cache), or, when they fit, as the float weights themselves,
made together for a trial's new entries. This counts, with a dispatch mode on the CPU (no GPU
needed; the caches are forced on with a byte budget), the aten operations that are not views, and
the buffers moved to the device (a copy each on a GPU; on the CPU no operation, so counted apart), for
three trials in a row on the bank of ``search_cost.py`` (K = 12: rtn, gptq, awq x 3, 4 bits x
per-channel, groups of 64) of SmolLM2-135M's first ``--blocks`` blocks: a uniform plan (every entry
new), another uniform plan, and the first again (every entry kept). Both caches must put the same
weights into the model: the script checks it.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import gransearch as gs  # noqa: E402
from gransearch.arch import get_module, linear_weight  # noqa: E402
from gransearch.bank import build_bank  # noqa: E402
from gransearch.quantizer import QuantizedWeight  # noqa: E402
from gransearch.search import _Assembler  # noqa: E402

from launches import Launches  # noqa: E402  (same folder: counts operations, views aside)
from search_cost import first_blocks  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=2)
    args = ap.parse_args()
    model, tok = gs.load_model("smollm2-135m")
    calib = gs.sample_windows(gs.load_tokens("wiki-sample", tok, "train"), 8, 512, seed=0)
    small = first_blocks(model, args.blocks)
    bank = build_bank(small, calib, ("rtn", "gptq", "awq"), (3, 4), ("channel", 64), fisher_windows=0, verbose=False)
    L = len(bank.layers)
    floats = sum(len(row) * e.quantized().codes.numel() * 4 for row, e in zip(bank.entries, (r[0] for r in bank.entries)))
    trials = {"uniform rtn:w4g64 (every entry new)": [bank.index(i, "rtn:w4g64") for i in range(L)],
              "uniform awq:w3c (every entry new)": [bank.index(i, "awq:w3c") for i in range(L)],
              "uniform rtn:w4g64 again (every entry kept)": [bank.index(i, "rtn:w4g64") for i in range(L)]}
    forms = {"codes cached (as before; a bank too large for the weights)": floats - 1, "weights cached": floats}
    rows, models = {}, {}
    moved: list[int] = []  # buffers a QuantizedWeight.to() moves: on the CPU no operation, on a GPU one copy each
    real_to = QuantizedWeight.to

    def counted_to(self, device):
        moved.append(sum(t is not None for t in (self.codes, self.scale, self.zero, self.g_idx)))
        return real_to(self, device)

    QuantizedWeight.to = counted_to
    for form, budget in forms.items():
        asm = _Assembler(small, bank, cache_bytes=budget)
        assert asm.keeps_weights == (budget >= floats)
        counts = []
        for choice in trials.values():
            moved.clear()
            with Launches() as n:
                asm.load(choice)
            counts.append((n.n, sum(moved)))
        rows[form], models[form] = counts, asm.model
    a, b = models.values()
    same = all(torch.equal(linear_weight(get_module(a, n)), linear_weight(get_module(b, n))) for n in bank.layers)
    print(f"## A trial's assembly, SmolLM2-135M's first {args.blocks} blocks ({L} layers), bank of K = 12: operations "
          f"(each a kernel or a copy on a GPU), torch {torch.__version__}")
    QuantizedWeight.to = real_to
    print("| trial | " + " | ".join(f"{f}: operations + buffers to the device" for f in forms) + " | ratio |\n|---|"
          + "---:|" * (len(forms) + 1))
    for k, name in enumerate(trials):
        (b_ops, b_mv), (n_ops, n_mv) = (rows[f][k] for f in forms)
        ratio = f"{(n_ops + n_mv) / (b_ops + b_mv):.3f}" if b_ops + b_mv else ""
        print(f"| {name} | {b_ops:,} + {b_mv:,} | {n_ops:,} + {n_mv:,} | {ratio} |")
    print(f"\nthe same weights in the model after the last trial: {same}")
    if not same:
        raise SystemExit("the two caches put different weights into the model")


if __name__ == "__main__":
    main()
