#!/usr/bin/env bash
# Every GPU figure of docs/scale.md and docs/export.md, one after another, each under its own time
# limit, so that a slow step cannot starve the ones after it. Logs and records go to OUT.
#
#   bash benchmarks/gpu_suite.sh OUT [STEPS]      STEPS: comma-separated names below, or all (default)
#
# gpu_tests       tests/test_gpu.py (GPU against CPU; CUDA graphs against eager mode)
# scale_search    the 1.7B-shaped model's whole search: bank, 20 trials, final (docs/scale.md)
# scale_quantize  the 1.7B-shaped model quantized from disk on the GPU: RTN, GPTQ
# graphs          one block's GPTQ solves (SmolLM2-135M's shapes), eager against CUDA graphs
# quantize_speed  whole-model GPTQ w4g64 on SmolLM2 against its floor (docs/scale.md)
# export_gpu      the compressed-tensors export loaded by transformers on the GPU (docs/export.md)
# search_cost     SmolLM2's bank of K = 12 and its trials against one GPTQ and one evaluation; then both
#                 under torch.profiler (search-profile.txt: how much of each bank stage the GPU computed)
# launches        one block's AWQ searches: the loop against the stacked grid, timed on the GPU
# awq_rank        SmolLM2's AWQ candidates with the rank-64 Hessian factors against the exact Hessians
# gc_pauses       the garbage collector's seconds in GPTQ, the bank and 30 trials, heap frozen or not
# readme_search   the README's whole search (bank, 60 trials, final), timed
#
# Each step's time limit can be set with LIMIT_<step>=SECONDS; SCALE_SEARCH_ARGS adds arguments.
# Seconds each step took (2026-11-27; the first SmolLM2 step also converts the GGUF): on one H100,
# gpu_tests 29, graphs 21, quantize_speed 39 to 64, search_cost 60 to 96 (warmed up: longer),
# readme_search 77; on one H200, gpu_tests 21, scale_search 242, scale_quantize 76 (after
# scale_search wrote the model), search_cost 48 to 52, launches 17, export_gpu 69, quantize_speed
# 24, readme_search 66. On a machine without network, scripts/gpu_prepare.sh makes what it needs.
set -u
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
STEPS=${2:-all}
PY=${PYTHON:-python}
WORK=${WORK:-/tmp/gransearch-gpu}  # model folders, banks and run folders: outside OUT
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS CMD...: run CMD under a time limit, its output to OUT/NAME.txt
  local name=$1 secs=$2; shift 2
  echo "=== $name (limit ${secs}s): $*" | tee -a "$OUT/suite.txt"
  local t0=$SECONDS
  (cd "${STEP_DIR:-$ROOT}" && timeout "$secs" "$@") > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/suite.txt"
  grep -v -E "it/s\]|s/it\]|^\s*$" "$OUT/$name.txt" | tail -n 25
}
want() { [ "$STEPS" = all ] || [[ ",$STEPS," == *",$1,"* ]]; }
limit() { local v="LIMIT_$1"; echo "${!v:-$2}"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$OUT/suite.txt" 2>&1
want gpu_tests && step gpu_tests "$(limit gpu_tests 150)" "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py
if want scale_search; then
  step scale_search "$(limit scale_search 900)" "$PY" benchmarks/scale_search.py --device cuda --out "$WORK/scale" \
    ${SCALE_SEARCH_ARGS:-} --record "$OUT/gpu-search.json"
fi
if want scale_quantize; then
  step scale_quantize "$(limit scale_quantize 600)" "$PY" benchmarks/scale.py --device cuda --methods rtn,gptq \
    --out "$WORK/scale" --record "$OUT/gpu-quantize.json"
fi
if want graphs; then
  STEP_DIR=$ROOT/benchmarks step graphs "$(limit graphs 120)" "$PY" quantize_speed.py --device cuda --graphs-only
fi
if want quantize_speed; then
  STEP_DIR=$ROOT/benchmarks step quantize_speed "$(limit quantize_speed 300)" "$PY" quantize_speed.py --device cuda
fi
if want export_gpu; then
  STEP_DIR=$ROOT/benchmarks step export_gpu "$(limit export_gpu 300)" "$PY" export_gpu.py --device cuda \
    --out "$WORK/export" --record "$OUT/export-gpu.json"
fi
if want search_cost; then
  STEP_DIR=$ROOT/benchmarks step search_cost "$(limit search_cost 400)" "$PY" search_cost.py --device cuda \
    --profile "$OUT/search-profile.txt"
fi
if want launches; then
  STEP_DIR=$ROOT/benchmarks step launches "$(limit launches 180)" "$PY" launches.py --device cuda --record "$OUT/launches.json"
fi
if want awq_rank; then
  STEP_DIR=$ROOT/benchmarks step awq_rank "$(limit awq_rank 180)" "$PY" awq_rank.py --device cuda --blocks 30 --rounds 2 \
    --record "$OUT/awq-rank.json"
fi
if want gc_pauses; then
  STEP_DIR=$ROOT/benchmarks step gc_pauses "$(limit gc_pauses 300)" "$PY" gc_pauses.py --device cuda --record "$OUT/gc-pauses.json"
fi
if want readme_search; then
  rm -rf "$WORK/w4g64"
  step readme_search "$(limit readme_search 600)" "$PY" -m gransearch optimize --model smollm2-135m --data wiki-sample \
    --budget-like w4g64 --bits 3,4,8 --grans channel,32,64 --trials 60 --n-final 1 --out "$WORK/w4g64" --device cuda
  cp "$WORK/w4g64/summary.json" "$OUT/readme-summary.json" 2>/dev/null
fi
