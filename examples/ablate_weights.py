"""Weight ablation on the packaged SmolLM2-135M: RTN, GPTQ, AWQ, AWQ+GPTQ x granularity x bits (issue 6).

    python examples/ablate_weights.py [--bits 8,4,3] [--grans tensor,channel,128,64,32] [--max-windows 40]
                                      [--out docs/data/ablation]

The same as ``gransearch ablate weights``: calibrate once (128 x 512 tokens of the wiki-sample train
split, seed 0), quantize every layer of every configuration from those statistics, evaluate on the
first 40 windows x 512 tokens of the test split. Writes ``weights.csv`` (resumes from it: delete a
row to recompute it), ``weights.md`` and ``weights.png``.
"""

import sys

from gransearch.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablate", "weights", *sys.argv[1:]]))
