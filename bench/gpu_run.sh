#!/usr/bin/env bash
# The GPU benchmark in one device call (about 9 minutes on an H100): write the 1B-shaped model, check the engine
# against `generate` (graph prefill off, on, and on with DECODE_AHEAD; step times of each), the serving sweep,
# then C=32 and 64 again with DECODE_AHEAD. With `interval` as third argument, only a second sweep at C=64 and 128
# with STREAM_INTERVAL=4 (fewer Redis messages and SSE chunks per token; ~3 minutes): is the API or Redis what
# holds the GPU back? With `header`, a sweep where every prompt opens with the same 24-token system message (as
# Llama 3's or Qwen's templates open with a fixed header), with the prefill graphs (which recompute that cached
# prefix) and without them (every prompt then continues it in an eager pass, as all did before commit 1e7e69b);
# give it CONCURRENCY 32,64 to stay within one call.
#   bash bench/gpu_run.sh OUT_DIR [CONCURRENCY] [all|interval|header]      (CONCURRENCY default 1,16,32,64,128)
# On the lent device machines the project's packages travel as wheels (bench/RESULTS.md, "Serving on a GPU").
set -uo pipefail
out=${1:?output folder}
levels=${2:-1,16,32,64,128}
phases=${3:-all}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
[ -d /tmp/l1b ] || python3 bench/serve_bench.py --write-model llama-1b /tmp/l1b | tail -1
check() {  # NAME, then settings
  local name=$1
  shift
  env "$@" timeout 150 python3 bench/engine_check.py /tmp/l1b --device cuda --requests 16 --tokens 32 2>&1 \
    | grep -v "Warning\|warn(" | tee "$out/check-$name.txt"
}
extra=()  # serve_bench options of every sweep
sweep() {  # NAME LEVELS, then settings
  local name=$1 at=$2
  shift 2
  env "$@" timeout 330 python3 bench/serve_bench.py /tmp/l1b --device cuda --concurrency "$at" --max-batch-size 128 \
    --baseline-requests 4 ${extra[@]+"${extra[@]}"} --json "$out/sweep-$name.json" > "$out/sweep-$name.txt" 2>&1
  echo "sweep $name exit $?"
  grep -v "Warning\|warn(" "$out/sweep-$name.txt" | tail -30
}
if [ "$phases" = header ]; then
  extra=(--header-tokens 24)
  sweep header-graphs "$levels" DECODE_AHEAD=false GRAPH_PREFILL_TOKENS=2048
  sweep header-eager "$levels" DECODE_AHEAD=false GRAPH_PREFILL_TOKENS=0
  exit 0
fi
if [ "$phases" = interval ]; then
  sweep interval4 64,128 STREAM_INTERVAL=4 DECODE_AHEAD=false
  exit 0
fi
check prefill-eager GRAPH_PREFILL_TOKENS=0
check prefill-graphs GRAPH_PREFILL_TOKENS=2048
check ahead DECODE_AHEAD=true
sweep default "$levels" DECODE_AHEAD=false
sweep ahead 32,64 DECODE_AHEAD=true
