#!/usr/bin/env bash
# Create .venv-gptqmodel for benchmarks/read_gptqmodel.py: GPTQModel 7.3.6 (the newest release that
# takes torch 2.13; 7.4 and later need torch >= 2.14.1, a multi-GB download here) built without
# CUDA, torch 2.13.0 as in scripts/setup.sh, gransearch from this checkout and the packaged assets.
# Not part of CI: GPTQModel is a comparison, never a dependency. About 2 minutes with a warm pip
# cache (it compiles two small C extensions of its dependencies).
#
# torchvision is left out: GPTQModel imports it for one vision model's preprocessing, and PyPI's
# torchvision wheels are CUDA builds that do not load against the CPU torch. The benchmark gives
# that import a stand-in module (benchmarks/read_gptqmodel.py, import_gptqmodel), never called.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/comparison_env.sh
BUILD_CUDA_EXT=0 comparison_env .venv-gptqmodel "gptqmodel==${GPTQMODEL_VERSION:-7.3.6}" requests
python - <<'PY'
import sys
sys.path.insert(0, "benchmarks")
from read_gptqmodel import import_gptqmodel

gptqmodel = import_gptqmodel()
import torch, transformers, gransearch
print("gptqmodel", gptqmodel.__version__, "| torch", torch.__version__, "| transformers", transformers.__version__)
PY
