#!/usr/bin/env bash
# Every GPU figure of docs/scale.md and docs/export.md, one after another, each under its own time
# limit, so that a slow step cannot starve the ones after it. Logs and records go to OUT.
#
#   bash benchmarks/gpu_suite.sh OUT [scale|smollm2|all] [SECONDS_FOR_THE_LAST_STEP]
#
# scale:   tests/test_gpu.py; the 1.7B-shaped model quantized from disk (RTN, GPTQ); its search
# smollm2: whole-model GPTQ against its floor; the export loaded by transformers; the bank and
#          trial costs; the README's whole search (bank, 60 trials, final), timed
set -u
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
PART=${2:-all}
LAST=${3:-600}
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
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$OUT/suite.txt" 2>&1
if [ "$PART" = scale ] || [ "$PART" = all ]; then
  step gpu_tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py
  step scale_quantize 180 "$PY" benchmarks/scale.py --device cuda --methods rtn,gptq --out "$WORK/scale" \
    --record "$OUT/gpu-quantize.json"
  step scale_search "$LAST" "$PY" benchmarks/scale_search.py --device cuda --out "$WORK/scale" ${SCALE_SEARCH_ARGS:-} \
    --record "$OUT/gpu-search.json"
  rm -rf "$WORK/scale"
fi
if [ "$PART" = smollm2 ] || [ "$PART" = all ]; then
  STEP_DIR=$ROOT/benchmarks step quantize_speed 150 "$PY" quantize_speed.py --device cuda
  STEP_DIR=$ROOT/benchmarks step export_gpu 150 "$PY" export_gpu.py --device cuda --out "$WORK/export" \
    --record "$OUT/export-gpu.json"
  rm -rf "$WORK/export"
  STEP_DIR=$ROOT/benchmarks step search_cost 180 "$PY" search_cost.py --device cuda
  step readme_search "$LAST" "$PY" -m gransearch optimize --model smollm2-135m --data wiki-sample --budget-like w4g64 \
    --bits 3,4,8 --grans channel,32,64 --trials 60 --n-final 1 --out "$WORK/w4g64" --device cuda
  cp "$WORK/w4g64/summary.json" "$OUT/readme-summary.json" 2>/dev/null
  rm -rf "$WORK/w4g64"
fi
