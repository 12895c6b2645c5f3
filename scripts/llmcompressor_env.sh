#!/usr/bin/env bash
# Create .venv-llmc for benchmarks/vs_llmcompressor.py: llm-compressor with the transformers and
# compressed-tensors versions it pins (transformers <= 5.17, compressed-tensors 0.19, which differ
# from .venv's), torch 2.13.0 as in scripts/setup.sh, gransearch from this checkout and the packaged
# assets. Not part of CI: llm-compressor is a comparison, never a dependency. About a minute with a
# warm pip cache.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/comparison_env.sh
comparison_env .venv-llmc "llmcompressor==${LLMCOMPRESSOR_VERSION:-0.14.0.1}"
python -c "import llmcompressor, transformers, compressed_tensors, gransearch; print('llmcompressor', llmcompressor.__version__, '| transformers', transformers.__version__, '| compressed-tensors', compressed_tensors.__version__)"
