"""Activation ablation (W8A8) on the packaged SmolLM2-135M (issue 6).

    python examples/ablate_activations.py [--alphas 0.25,0.5,0.75,0.9] [--thresholds 6,3] [--out docs/data/ablation]

The same as ``gransearch ablate activations``: weights RTN per-channel 8-bit in every row;
activations per tensor (static, dynamic), per token (dynamic), per channel (the ideal); SmoothQuant
over alpha; LLM.int8()-style outlier columns over thresholds; per-tensor activations on one kind of
layer at a time. Static scales and SmoothQuant from 32 x 512 tokens of the train split; evaluation on
the first 40 windows x 512 tokens of the test split. Writes ``activations.csv`` (resumable),
``activations.md`` and ``activations.png``. Diagnostics: ``gransearch diagnose --out docs/data/ablation``.
"""

import sys

from gransearch.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablate", "activations", *sys.argv[1:]]))
